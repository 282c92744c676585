"""Data contracts of mates: table schemas, the recipe, the streams manifest, object-store URLs.

Nothing here imports from `curation`, `training` or `jobs`: data flows one way,
jobs -> training/curation -> schemas.
"""
from schemas.errors import MatesError

__all__ = ["MatesError"]
