"""What `mates report` reads of a run: its metrics and, per committed stage, its tables."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from curation.store.catalog import read_catalog
from curation.store.stage_index import stage_committed, stage_url
from schemas.errors import MatesError
from schemas.recipe import load_recipe
from schemas.storage import read_parquet, store_for
from schemas.tables import metrics_by_stage


@dataclass
class RunView:
    """What the report needs from one run: its metrics and, per committed stage, its tables."""

    url: str
    method: str
    seed: int
    data: str
    metrics: list[dict]                         # one dict per stage, `loss` = {eval set: loss}
    stages: dict = field(default_factory=dict)  # k -> {"selection", "scores", "probes", "audit", "marker"}
    kinds: dict = field(default_factory=dict)   # eval set -> loss kind
    primary: str | None = None                  # the eval set a comparison ranks by
    from_tables: bool = False                   # rebuilt from a comparison's tables: no stage folders


TABLES_OF_A_RUN = ("metrics.parquet", "stages.parquet", "audits.parquet")


def comparison_rows(folder: str) -> dict[str, list[dict]]:
    """The rows of a comparison's tables that `view_from_tables` needs, each table read once."""
    store = store_for(folder)
    return {name: read_parquet(folder, name).to_pylist() if store.exists(name) else [] for name in TABLES_OF_A_RUN}


def view_from_tables(tables: dict[str, list[dict]], method: str, seed: int, data: str, url: str = "") -> RunView:
    """A comparison run whose folder is gone, from the comparison's committed tables
    (`comparison_rows`): its losses (metrics.parquet), per curated stage its curation seconds and
    FLOPs (stages.parquet) and its audit (audits.parquet, which holds the source mix). Enough for
    the loss, compute and source plots; the probe, cluster and phase plots need the run folder."""
    def mine(name):
        return [r for r in tables[name] if r["method"] == method and r["seed"] == seed]

    rows = mine("metrics.parquet")
    view = RunView(url, method, seed, data, metrics_by_stage(rows), kinds={r["eval_set"]: r["loss_kind"] for r in rows},
                   from_tables=True)
    audits = mine("audits.parquet")
    for r in mine("stages.parquet"):
        view.stages[r["stage"]] = {"marker": {"curation_seconds": r["curation_seconds"],
                                              "curation_flops": r.get("curation_flops")},
                                   "selection": None, "scores": None, "probes": None,
                                   "audit": [a for a in audits if a["stage"] == r["stage"]] or None}
    return view


def load_run(url: str) -> RunView:
    store = store_for(url)
    if not store.exists("recipe.yaml"):
        raise MatesError(f"`{url}` holds no recipe.yaml: not a mates run (nor a `mates compare` folder).")
    recipe = load_recipe(store.read_bytes("recipe.yaml").decode(), {"run": url})
    rows = read_parquet(url, "metrics.parquet").to_pylist() if store.exists("metrics.parquet") else []
    view = RunView(url, recipe.stages.method, recipe.seed, recipe.data, metrics_by_stage(rows),
                   kinds={r["eval_set"]: r["loss_kind"] for r in rows})
    view.primary = recipe.eval.primary or next(iter(view.kinds), None)
    for k in range(recipe.stages.count):
        if not stage_committed(url, k):
            continue
        s = store_for(stage_url(url, k))
        parts = [p for p in s.listdir("scores") if p.endswith(".parquet")]
        view.stages[k] = {
            "marker": json.loads(s.read_bytes("_SUCCESS")),
            "selection": read_parquet(stage_url(url, k), "selection.parquet").to_pydict(),
            "scores": _concat([read_parquet(stage_url(url, k), "scores", p).to_pydict() for p in parts]),
            "probes": read_parquet(stage_url(url, k), "probes.parquet").to_pydict() if s.exists("probes.parquet") else None,
            "audit": read_parquet(stage_url(url, k), "audit.parquet").to_pylist() if s.exists("audit.parquet") else None,
        }
    return view


def _concat(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    return {key: sum((p[key] for p in parts), []) for key in parts[0]}


def sources_of(data_url: str) -> np.ndarray:
    catalog = read_catalog(data_url, ["source"]).to_pydict()            # two columns, not the previews
    out = np.empty(len(catalog["sample_id"]), dtype=object)
    out[np.asarray(catalog["sample_id"])] = catalog["source"]
    return out


def source_mix(sources: np.ndarray, ids) -> dict[str, float]:
    names, counts = np.unique(sources[np.asarray(ids, dtype=np.int64)], return_counts=True)
    return {str(n): c / max(counts.sum(), 1) for n, c in zip(names, counts)}
