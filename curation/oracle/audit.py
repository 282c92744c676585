"""The oracle audit on its own: which groups of the pool does the one-step oracle call helpful,
for each target and each probe method, on one model state?

This answers the question the stage audit (curation/oracle/stage_audit.py) raises before any influence model
is fitted: is the target sane for this model? Probes are stratified by a catalog column (the same
number per group, so a small junk tier is measured as well as a large source), drawn once with a
seed, and shared: every method probes the first `per_group[method]` samples of each group, so
the methods can be compared sample by sample (Spearman on the probes they share).

I(x) is z-scored over all probes of one (target, method); a group's mean z < 0 means the oracle
prefers it. `mates audit-oracle` is the command.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from curation.lm.batching import ReferenceSet
from curation.influence.fitting import spearman
from curation.store.catalog import catalog_columns, read_catalog
from curation.store.pool import MDSFolder
from schemas.errors import MatesError
from schemas.storage import join


def stratified_probes(catalog: pa.Table, group_by: str, per_group: int, seed: int) -> dict[str, np.ndarray]:
    """{group: `per_group` sample ids drawn without replacement} (fewer where a group is smaller)."""
    ids = np.asarray(catalog.column("sample_id"))
    groups = np.asarray(catalog.column(group_by).cast(pa.string()).to_pylist(), dtype=object)
    rng = np.random.default_rng([seed, 4242])
    return {g: rng.permutation(ids[groups == g])[:per_group] for g in sorted(set(groups))}


def _summary(groups: dict[str, np.ndarray], influence: dict[int, float]) -> list[dict]:
    z_all = np.array(list(influence.values()))
    mean, std = z_all.mean(), z_all.std() or 1.0
    rows = []
    for g, ids in groups.items():
        z = (np.array([influence[int(i)] for i in ids]) - mean) / std
        rows.append({"group": g, "probes": len(z), "mean_z": float(z.mean()),
                     "se": float(z.std(ddof=1) / np.sqrt(len(z))) if len(z) > 1 else None,
                     "mean_influence": float(np.mean([influence[int(i)] for i in ids]))})
    return rows


def oracle_audit(state: dict, data_url: str, *, targets: dict[str, ReferenceSet], per_group: dict[str, int],
                 group_by: str = "source", seed: int = 0, pad_id: int, probe_batch: int = 16,
                 device: str = "cpu", log=print) -> dict:
    """{"rows": [{target, method, group, probes, mean_z, se, mean_influence}], "spearman": [...],
    "seconds": {...}} for every target x method."""
    from curation.oracle.probes import probe_influence

    columns = catalog_columns(data_url)
    if group_by not in columns:
        raise MatesError(f"`--group-by` must be a catalog column ({', '.join(columns)}); got {group_by!r}.")
    catalog = read_catalog(data_url, [group_by])               # two columns, not the previews
    drawn = stratified_probes(catalog, group_by, max(per_group.values()), seed)
    pool = MDSFolder(join(data_url, "pool"))
    rows, agreement, seconds = [], [], {}
    for target, reference in targets.items():
        found: dict[str, dict[int, float]] = {}
        for method, n in per_group.items():
            groups = {g: ids[:n] for g, ids in drawn.items()}
            ids = np.concatenate(list(groups.values()))
            t0 = time.perf_counter()
            values = probe_influence(state, reference, [pool[int(i)] for i in ids], method=method,
                                     probe_batch=probe_batch, pad_id=pad_id, device=device)
            seconds[f"{target}/{method}"] = time.perf_counter() - t0
            found[method] = dict(zip(ids.tolist(), values.tolist()))
            rows += [{"target": target, "method": method, **r} for r in _summary(groups, found[method])]
            log(f"  {target} / {method}: {len(ids)} probes in {seconds[f'{target}/{method}']:.1f} s")
        methods = list(found)
        means = {m: {r["group"]: r["mean_z"] for r in rows if r["target"] == target and r["method"] == m}
                 for m in methods}
        order = {m: sorted(z, key=z.get) for m, z in means.items()}  # most to least preferred group
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                shared = sorted(set(found[a]) & set(found[b]))
                agreement.append({"target": target, "a": a, "b": b, "probes": len(shared),
                                  "spearman": spearman(np.array([found[a][s] for s in shared]),
                                                       np.array([found[b][s] for s in shared])),
                                  "same_group_order": order[a] == order[b],
                                  "group_spearman": spearman(np.array([means[a][g] for g in order[a]]),
                                                             np.array([means[b][g] for g in order[a]]))})
    return {"rows": rows, "spearman": agreement, "seconds": seconds}


def audit_markdown(result: dict) -> str:
    """One table: a row per group, a column per (target, method) with mean z +- standard error."""
    cols = list(dict.fromkeys((r["target"], r["method"]) for r in result["rows"]))
    cell = {(r["target"], r["method"], r["group"]): r for r in result["rows"]}
    groups = list(dict.fromkeys(r["group"] for r in result["rows"]))
    first = cols[0]
    groups.sort(key=lambda g: cell[(*first, g)]["mean_z"])
    head = "| group | " + " | ".join(f"{t} / {m} (n/group)" for t, m in cols) + " |"
    lines = [head, "| --- |" + " ---: |" * len(cols)]
    for g in groups:
        cells = []
        for t, m in cols:
            r = cell[(t, m, g)]
            se = f" ± {r['se']:.2f}" if r["se"] is not None else ""
            cells.append(f"{r['mean_z']:+.2f}{se} ({r['probes']})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- Spearman {a['a']} vs {a['b']} on `{a['target']}` ({a['probes']} shared probes): {a['spearman']:.3f}"
              + ("" if "same_group_order" not in a else
                 f"; groups' mean z: Spearman {a['group_spearman']:.3f}, order "
                 f"{'the same' if a['same_group_order'] else 'differs'}")
              for a in result["spearman"]]
    return "\n".join(lines)
