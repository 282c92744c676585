"""The stores (DESIGN.md 2.5, 3): what a boundary reads from and writes to the object store.

`pool` (the MDS pool reader), `stage_index` (selection -> MDS buckets + streams manifest, the
`_SUCCESS` commit), `run_views` (DuckDB views over a run's tables for `mates query`). The
embedding store computes what it misses with the encoder, so it lives with the encoder in
`curation.influence.embeddings`.
May import: `curation.data`, `curation.failpoints`, `schemas`.
"""
