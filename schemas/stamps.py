"""Stamped JSON configs: every saved model folder carries a small JSON with its format name and
version, written last (so an unfinished save has none). Readers refuse a mismatch clearly."""
from __future__ import annotations

import json

from schemas.errors import MatesError
from schemas.storage import Store


def read_stamped_json(store: Store, name: str, *, fmt: str, version: int, what: str) -> dict:
    """The JSON `name` under `store`, checked to be `fmt` at `version`; `what` names the thing."""
    url = store.url
    if not store.exists(name):
        raise MatesError(f"`{url}` has no {name}; not a saved {what} (or its save did not finish).")
    try:
        config = json.loads(store.read_bytes(name))
    except ValueError as exc:
        raise MatesError(f"`{url}/{name}` is not JSON: {exc}") from exc
    seen = config.get("format") if isinstance(config, dict) else None
    if seen != fmt:
        raise MatesError(f"`{url}/{name}` has format {seen!r}; expected {fmt!r}.")
    if config.get("version") != version:
        raise MatesError(f"`{url}` is {fmt} version {config.get('version')}; this mates reads "
                         f"version {version}. Refit the {what}.")
    return config
