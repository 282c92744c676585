"""The curation cost of a stage boundary, per phase, from its `_SUCCESS` marker (a contract between
the stage job, which writes `seconds_<phase>`, and the console summary and `mates report`).

Phases: probe (oracle probes; Group-MATES' trajectories too), embed (new embeddings only, the
frozen backbone), fit (influence model or head; Group-MATES' relational model too), score,
cluster, select, index (the stage index writer) and other (the rest of the job: loading, the
scores parts, ...). `total` is the job's `curation_seconds`.
"""
from __future__ import annotations

PHASES = ("probe", "embed", "fit", "score", "cluster", "select", "index", "other")
_FOLDED = {"probe": ("probe", "group_oracle"), "fit": ("fit", "relational_fit")}


def stage_costs(marker: dict) -> dict[str, float]:
    """{phase: seconds} for every phase in PHASES, plus `total` and (when known) `share`."""
    out = {}
    for phase in PHASES[:-1]:
        out[phase] = float(sum(marker.get(f"seconds_{k}", 0.0) for k in _FOLDED.get(phase, (phase,))))
    total = float(marker.get("curation_seconds", sum(out.values())))
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    if marker.get("curation_share_of_training") is not None:
        out["share"] = float(marker["curation_share_of_training"])
    return out


def stage_compute(metrics_row: dict, marker: dict) -> tuple[float | None, float | None]:
    """(FLOPs, seconds) a stage cost: its training (`metrics.parquet`'s `train_flops`,
    `train_seconds`) plus the curation of the boundary that fed it (the marker's `curation_flops`,
    `curation_seconds`); None for a unit a run written before the ledger lacks."""
    def total(train, curation):
        return None if train is None or curation is None else float(train) + float(curation)
    return (total(metrics_row.get("train_flops"), marker.get("curation_flops", 0.0)),
            total(metrics_row.get("train_seconds"), marker.get("curation_seconds", 0.0)))
