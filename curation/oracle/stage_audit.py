"""The stage audit: what one boundary's curation prefers, per group of a catalog column.

For every group (by default the catalog's `source`): how many candidates it has, its share of
the candidates and of the selection, the method's score (z-scored over the candidates: for MATES
the influence model's prediction, for the baselines their own score), and, where the method
probed the oracle, the mean z-scored oracle influence I(x) of its probes with its standard error.
Lower z = preferred (more helpful). DuckDB does the grouping over the catalog join; the table is
written as `stages/<k>/audit.parquet` before the stage's `_SUCCESS`.

A user sees at once what the curation prefers and whether that is sane: an oracle that rates
character noise above on-target text is a wrong target, not a method that works.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas import tables

_SQL = """
WITH c AS (SELECT g.grp, c.z, c.selected FROM cand c JOIN cat g USING (sample_id)),
     p AS (SELECT g.grp, p.z FROM probe p JOIN cat g USING (sample_id)),
     cs AS (SELECT grp, count(*) AS n, avg(z) AS m, stddev_samp(z) / sqrt(count(*)) AS se,
                   sum(CAST(selected AS INTEGER)) AS n_sel FROM c GROUP BY grp),
     ps AS (SELECT grp, count(*) AS n, avg(z) AS m, stddev_samp(z) / sqrt(count(*)) AS se FROM p GROUP BY grp)
SELECT cs.grp AS "group", cs.n AS candidates,
       cs.n / (SELECT count(*) FROM c) AS candidate_share,
       cs.n_sel / greatest((SELECT sum(CAST(selected AS INTEGER)) FROM c), 1) AS selected_share,
       cs.m AS score_mean_z, cs.se AS score_se,
       coalesce(ps.n, 0) AS probes, ps.m AS oracle_mean_z, ps.se AS oracle_se
FROM cs LEFT JOIN ps USING (grp)
ORDER BY coalesce(ps.m, cs.m), cs.grp
"""


def zscore(values) -> np.ndarray:
    """(v - mean) / std; all zeros when the values are constant (random's scores)."""
    v = np.asarray(values, dtype=np.float64)
    std = v.std()
    return (v - v.mean()) / std if std > 0 else np.zeros_like(v)


def audit_table(groups: pa.Table, *, stage: int, group_by: str, candidates: np.ndarray, scores: np.ndarray,
                selected: np.ndarray, probe_ids: np.ndarray | None = None,
                probe_influence: np.ndarray | None = None) -> pa.Table:
    """The AUDIT table of one stage; `groups` holds `sample_id` and the `group_by` column."""
    import duckdb

    cat = pa.table({"sample_id": groups.column("sample_id"),
                    "grp": groups.column(group_by).cast(pa.string()).fill_null("(null)")})
    cand = pa.table({"sample_id": np.asarray(candidates, np.int64), "z": zscore(scores),
                     "selected": np.asarray(selected, bool)})
    if probe_ids is None or len(probe_ids) == 0:
        probe = pa.table({"sample_id": pa.array([], pa.int64()), "z": pa.array([], pa.float64())})
    else:
        probe = pa.table({"sample_id": np.asarray(probe_ids, np.int64), "z": zscore(probe_influence)})
    con = duckdb.connect()
    for name, table in (("cat", cat), ("cand", cand), ("probe", probe)):
        con.register(name, table)
    out = con.sql(_SQL).to_arrow_table()
    con.close()
    n = out.num_rows
    out = out.append_column("stage", pa.array([stage] * n, pa.int32()))
    out = out.append_column("group_by", pa.array([group_by] * n, pa.string()))
    return tables.conform(out, tables.AUDIT)


def audit_line(audit: pa.Table) -> str | None:
    """One console line: the most and least preferred groups (by oracle where probed, else score)."""
    rows = audit.to_pylist()
    by_oracle = any(r["probes"] for r in rows)
    key = "oracle_mean_z" if by_oracle else "score_mean_z"
    ranked = [r for r in rows if r[key] is not None]
    if len(ranked) < 2 or (not by_oracle and all(abs(r[key]) < 1e-12 for r in ranked)):
        return None  # a constant score (random) prefers nothing

    def said(r: dict) -> str:
        oracle = f"oracle {r['oracle_mean_z']:+.2f} z, " if r["oracle_mean_z"] is not None else ""
        return (f"{r['group']} ({oracle}score {r['score_mean_z']:+.2f} z, {100 * r['selected_share']:.0f}% of "
                f"the selection vs {100 * r['candidate_share']:.0f}% of candidates)")

    ranked.sort(key=lambda r: r[key])
    return f"audit by {rows[0]['group_by']} ({'oracle' if by_oracle else 'score'}): prefers " \
           f"{said(ranked[0])}; avoids {said(ranked[-1])}"
