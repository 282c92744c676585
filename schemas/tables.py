"""Arrow schemas of every table mates writes (DESIGN.md section 3).

Each schema carries its name and version in the Parquet metadata (`mates.table`,
`mates.version`); `conform` casts a table to its schema and refuses missing columns with a
clear error, so a reader never sees a table of the wrong shape.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.errors import MatesError

FORMAT_VERSION = "1"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"mates.table": name, "mates.version": FORMAT_VERSION})


# <data>/catalog/part-<file>.parquet (one per pool part; older pools: one catalog/samples.parquet):
# one row per sample (a fixed-length slice of one document).
CATALOG = _schema("catalog", [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("chunk", pa.int32(), nullable=False),       # index of the slice within its document
    pa.field("shard", pa.int32(), nullable=False),       # index into index.json's `shards`
    pa.field("index_in_shard", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("text_sha1", pa.string(), nullable=False),  # sha1 of the slice's text, for dedup
    pa.field("preview", pa.string(), nullable=False),    # first characters of the slice's text
])

# <run>/stages/<k>/probes.parquet: oracle influence per probed sample (DESIGN.md 2.1).
PROBES = _schema("probes", [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("influence", pa.float64(), nullable=False),  # L_ref(after one step) - L_ref(before)
    pa.field("method", pa.string(), nullable=False),      # exact | first_order
    pa.field("stage", pa.int32(), nullable=False),
])

# <run>/stages/<k>/scores/part-*.parquet: the influence model's prediction per candidate.
SCORES = _schema("scores", [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("prediction", pa.float32(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),      # -1 when the method does not cluster
    pa.field("rank", pa.int64(), nullable=False),         # 0 = best (lowest prediction)
])

# <run>/stages/<k>/selection.parquet: every candidate, selected or not.
SELECTION = _schema("selection", [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("weight", pa.float64(), nullable=False),     # the bucket's stream proportion
    pa.field("selected", pa.bool_(), nullable=False),
])

# <run>/metrics.parquet: one row per (evaluation point, eval set); stage -1 = the initial model.
METRICS = _schema("metrics", [
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("eval_set", pa.string(), nullable=False),         # <data>/eval/<name>.parquet
    pa.field("loss_kind", pa.string(), nullable=False),        # lm (every token) | cloze (target word)
    pa.field("loss", pa.float64(), nullable=False),            # mean loss per counted token
    pa.field("perplexity", pa.float64(), nullable=False),      # exp(loss)
    pa.field("batches_seen", pa.int64(), nullable=False),
    pa.field("tokens_seen", pa.int64(), nullable=False),
    pa.field("train_tokens_per_s", pa.float64(), nullable=False),
    pa.field("curation_seconds", pa.float64(), nullable=False),
    pa.field("train_seconds", pa.float64(), nullable=False),
    # 3F x the stage's trained tokens (curation/compute.py, README "Compute ledger"); null: a run
    # written before the ledger
    pa.field("train_flops", pa.float64(), nullable=True),
])

# <run>/stages/<k>/audit.parquet: what the stage's curation prefers, per catalog group.
AUDIT = _schema("audit", [
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("group_by", pa.string(), nullable=False),         # the catalog column (stages.audit_by)
    pa.field("group", pa.string(), nullable=False),
    pa.field("candidates", pa.int64(), nullable=False),
    pa.field("candidate_share", pa.float64(), nullable=False),
    pa.field("selected_share", pa.float64(), nullable=False),  # share of the stage's selection
    pa.field("score_mean_z", pa.float64(), nullable=False),    # the method's score, z over candidates
    pa.field("score_se", pa.float64(), nullable=True),         # standard error of that mean
    pa.field("probes", pa.int64(), nullable=False),            # oracle probes in the group (0: none)
    pa.field("oracle_mean_z", pa.float64(), nullable=True),    # I(x), z over probes; lower = more helpful
    pa.field("oracle_se", pa.float64(), nullable=True),
])

# <comparison>/runs.parquet: one row per (method, seed, eval set) run of `mates compare`.
COMPARISON_RUNS = _schema("comparison_runs", [
    pa.field("method", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("run", pa.string(), nullable=False),               # the run's URL
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("primary", pa.bool_(), nullable=False),            # the set the comparison ranks by
    pa.field("final_loss", pa.float64(), nullable=False),
    pa.field("tokens_seen", pa.int64(), nullable=False),
    # training tokens at which the run's loss on this set first reaches random's mean final loss
    # (linear between evaluation points); null when it never does
    pa.field("tokens_to_random_final", pa.float64(), nullable=True),
    pa.field("curated_tokens", pa.int64(), nullable=False),    # tokens of the curated stages (k >= 1)
    pa.field("curated_tokens_to_random_final", pa.float64(), nullable=True),  # counted from the first boundary
    pa.field("curation_seconds", pa.float64(), nullable=False),  # curated stages (k >= 1)
    pa.field("train_seconds", pa.float64(), nullable=False),     # all stages
    # the compute ledger: training + curation of the curated stages (k >= 1), and how much of it
    # the run spent until its loss first reached random's mean final loss (null: never, or a run
    # written before the ledger)
    pa.field("curated_flops", pa.float64(), nullable=True),
    pa.field("curated_flops_to_random_final", pa.float64(), nullable=True),
    pa.field("curated_seconds", pa.float64(), nullable=True),
    pa.field("curated_seconds_to_random_final", pa.float64(), nullable=True),
])

# <comparison>/stages.parquet: one row per curated stage (k >= 1) of every `mates compare` run,
# from the stage's `_SUCCESS`: how well the influence model fitted and what curation cost.
COMPARISON_STAGES = _schema("comparison_stages", [
    pa.field("method", pa.string(), nullable=False),            # the comparison entry (e.g. mates@frozen)
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("target", pa.string(), nullable=True),             # the target set curation aimed at
    pa.field("influence_spearman", pa.float64(), nullable=True),   # the influence model's, held-out probes
    pa.field("relational_spearman", pa.float64(), nullable=True),  # Group-MATES' relational model's
    # 5-fold cross-validated Spearman of a linear-head influence model (frozen, ngram); null otherwise
    pa.field("influence_cv_spearman", pa.float64(), nullable=True),
    pa.field("curation_seconds", pa.float64(), nullable=False),
    pa.field("train_seconds", pa.float64(), nullable=True),     # the stage's measured training seconds
    pa.field("curation_share_of_training", pa.float64(), nullable=True),  # curation / measured training
    pa.field("curation_flops", pa.float64(), nullable=True),    # the ledger's (null: a table written before it)
])

# <comparison>/audits.parquet: every run's stage audits (stages/<k>/audit.parquet), stacked.
def _comparison_audits() -> pa.Schema:
    return _schema("comparison_audits", [pa.field("method", pa.string(), nullable=False),
                                         pa.field("seed", pa.int64(), nullable=False), *AUDIT])


COMPARISON_AUDITS = _comparison_audits()

# <data>/embeddings/<encoder-key>/part-*.parquet: the frozen encoder's pooled state per sample
# (curation/influence/embeddings.py). The width and float type are settings of the store (stamped in its
# embeddings.json), so the schema is built per store; EMBEDDINGS is MiniLM's 384 x float32.
def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    value = {"float32": pa.float32(), "float16": pa.float16()}.get(dtype)
    if value is None:
        raise MatesError(f"`embeddings dtype` must be float32 or float16; got {dtype!r}.")
    return _schema("embeddings", [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", value, nullable=False), int(dim)), nullable=False),
    ])


EMBEDDINGS = embeddings_schema(384)

# <data>/targets/<name>.parquet and <data>/eval/<name>.parquet: tokenized sets (curation/data/sets.py).
REFERENCE = _schema("reference", [
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_start", pa.int32(), nullable=False),  # loss counted on tokens >= this index
])

ALL = {s.metadata[b"mates.table"].decode(): s
       for s in (CATALOG, PROBES, SCORES, SELECTION, METRICS, AUDIT, REFERENCE, COMPARISON_RUNS,
                 COMPARISON_STAGES, COMPARISON_AUDITS, EMBEDDINGS)}


def metrics_by_stage(rows: list[dict]) -> list[dict]:
    """METRICS rows (stage x eval set) -> one dict per stage: its common fields + `loss` {set: loss}."""
    stages: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: r["stage"]):
        st = stages.setdefault(r["stage"], {k: v for k, v in r.items()
                                            if k not in ("eval_set", "loss_kind", "loss", "perplexity")})
        st.setdefault("loss", {})[r["eval_set"]] = r["loss"]
    return list(stages.values())


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema`; a missing column is an error."""
    name = schema.metadata[b"mates.table"].decode()
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise MatesError(f"`{name}` table lacks columns {missing}; expected {schema.names}.")
    columns = [table.column(f.name).cast(f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def check_version(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Refuse a table written by another format version of mates."""
    meta = table.schema.metadata or {}
    seen = meta.get(b"mates.version", b"?").decode()
    if seen != FORMAT_VERSION:
        name = schema.metadata[b"mates.table"].decode()
        raise MatesError(f"`{where}` is a {name} table of format version {seen}; this mates reads "
                         f"version {FORMAT_VERSION}. Re-run the step that wrote it.")
