"""Curation methods, resolved by name (`stages.method` in the recipe).

Each method is a small class in its own file with one method to implement, `predict`, which
returns a predicted influence per candidate (lower = better); selection, buckets and the index
are shared (curation/stage_job.py). Heavy dependencies are imported when a method is built.
"""
from __future__ import annotations

import importlib

from schemas.errors import MatesError

# name -> "module:Class"; kept in step with schemas.method_options.METHOD_OPTIONS (a test checks).
REGISTRY = {
    "random": "curation.methods.random_method:RandomMethod",
    "mates": "curation.methods.mates_method:MatesMethod",
    "group_mates": "curation.methods.group_mates_method:GroupMatesMethod",
    "perplexity": "curation.methods.perplexity_method:PerplexityMethod",
    "dsir": "curation.methods.dsir_method:DsirMethod",
    "classifier": "curation.methods.classifier_method:ClassifierMethod",
}


def get_method(name: str):
    if name not in REGISTRY:
        raise MatesError(f"`stages.method` must be one of {', '.join(sorted(REGISTRY))}; got {name!r}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
