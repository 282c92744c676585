"""Selection (DESIGN.md 2.3, 2.4): from predicted influence to the samples a stage keeps.

`gumbel` (Gumbel-top-k, score buckets, ranks), `clustering` (spherical k-means), `greedy`
(Group-MATES' relational greedy within clusters), `metadata` + `sql/` (DuckDB cluster statistics,
quotas, dedup, top-k per cluster, the selection manifest).
May import: `schemas` only; it works on arrays and tables, not on models or stores.
"""
