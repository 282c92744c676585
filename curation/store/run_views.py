"""Read-only DuckDB views over every table of a run (and its pool's sample catalog).

Views: `samples` (the catalog), `embeddings` (the pool's stored encoder embeddings, with the
store's key as `encoder`), `metrics` (stage x eval set), and across committed stages `probes`,
`trajectories`, `scores`, `selection`, `audit` (preferences per catalog group), `stages` (one row
per committed stage, from its `_SUCCESS` marker). A stage
without `_SUCCESS` does not exist here either.

Read-only by construction: the run and data roots are mounted through fsspec filesystems that
refuse every write (protocols `matesrun://` and `matesdata://`), DuckDB's own local filesystem is
disabled, and the configuration is locked, so no query can write to the run (or anywhere).
"""
from __future__ import annotations

import json

import duckdb
from fsspec.implementations.dirfs import DirFileSystem

from curation.store.catalog import catalog_names
from schemas.errors import MatesError
from schemas.shared_reads import SharedReader
from schemas.storage import join, store_for

TABLES = ("probes", "trajectories", "scores", "selection", "audit")


class _ReadOnlyDir(DirFileSystem):
    """A folder of a local or S3 store, readable and never writable."""

    def __init__(self, store):
        super().__init__(path=store.root, fs=store.fs)

    @classmethod
    def for_protocol(cls, protocol: str, store) -> "_ReadOnlyDir":
        # fsspec strips a URL's protocol with a classmethod, so the name must be on the class.
        return type(f"ReadOnly_{protocol}", (cls,), {"protocol": protocol})(store)

    def _refuse(self, *args, **kwargs):
        raise PermissionError("mates query is read-only")

    def open(self, path, mode="rb", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            self._refuse()
        return SharedReader(super().open(path, mode, *args, **kwargs))

    _open = open

    rm = rm_file = mkdir = makedirs = put_file = pipe_file = mv = cp_file = touch = _refuse


def committed_stages(run_url: str) -> list[int]:
    store = store_for(run_url)
    stages = [int(s) for s in store.listdir("stages") if s.isdigit()]
    return sorted(s for s in stages if store.exists("stages", str(s), "_SUCCESS"))


def _stage_files(run_url: str, stage: int, table: str) -> list[str]:
    store = store_for(join(run_url, "stages", str(stage)))
    if table == "scores":
        return [f"stages/{stage}/scores/{p}" for p in store.listdir("scores") if p.endswith(".parquet")]
    return [f"stages/{stage}/{table}.parquet"] if store.exists(f"{table}.parquet") else []


def open_run(run_url: str, data_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the run's views; `data_url` defaults to the run recipe's `data`."""
    run_store = store_for(run_url)
    if not run_store.exists("recipe.yaml"):
        raise MatesError(f"`run` {run_url!r} holds no recipe.yaml; not a mates run.")
    if data_url is None:
        from schemas import bounds

        saved = bounds.load_yaml(run_store.read_bytes("recipe.yaml"), f"{run_url}/recipe.yaml")
        data_url = saved.get("data") if isinstance(saved, dict) else None
        bounds.check_url(data_url, f"{run_url}/recipe.yaml: data")
    con = duckdb.connect(":memory:")
    con.register_filesystem(_ReadOnlyDir.for_protocol("matesrun", run_store))
    con.register_filesystem(_ReadOnlyDir.for_protocol("matesdata", store_for(data_url)))
    stages = committed_stages(run_url)
    for table in TABLES:
        parts = []
        for stage in stages:
            files = ", ".join(f"'matesrun://{f}'" for f in _stage_files(run_url, stage, table))
            if files:
                pick = "*" if table in ("probes", "trajectories", "audit") else f"{stage}::INTEGER AS stage, *"
                parts.append(f"SELECT {pick} FROM read_parquet([{files}])")
        if parts:
            con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))
    catalog = catalog_names(data_url, missing_ok=True)     # one file per pool part (or one old file)
    if catalog:
        files = ", ".join(f"'matesdata://catalog/{name}'" for name in catalog)
        con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet([{files}])")
    data_store = store_for(data_url)
    stores = [k for k in data_store.listdir("embeddings") if data_store.exists("embeddings", k, "embeddings.json")
              and any(p.startswith("part-") for p in data_store.listdir("embeddings", k))]
    if stores:  # the pool's embedding stores (curation/influence/embeddings.py), one `encoder` key each
        con.execute("CREATE VIEW embeddings AS " + " UNION ALL BY NAME ".join(
            f"SELECT '{k}' AS encoder, * FROM read_parquet('matesdata://embeddings/{k}/part-*.parquet')"
            for k in stores))
    if run_store.exists("metrics.parquet"):
        con.execute("CREATE VIEW metrics AS SELECT * FROM read_parquet('matesrun://metrics.parquet')")
    markers = [json.loads(run_store.read_bytes("stages", str(s), "_SUCCESS")) for s in stages]
    con.register("_stage_markers", _markers_table(markers))
    con.execute("CREATE VIEW stages AS SELECT * FROM _stage_markers")
    con.execute("SET disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET autoinstall_known_extensions = false")  # no httpfs: no reads outside the run
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
    return con


def _markers_table(markers: list[dict]):
    import pyarrow as pa

    keys = ["stage", "method", "selected", "candidates", "candidates_mode", "curation_seconds", "curation_share_of_training",
            *(f"seconds_{p}" for p in ("probe", "embed", "fit", "score", "cluster", "select", "index")),
            "curation_flops",  # the compute ledger (README "Compute ledger")
            *(f"flops_{p}" for p in ("probe", "group_oracle", "embed", "fit", "relational_fit", "score"))]
    return pa.table({k: [m.get(k) for m in markers] for k in keys}) if markers else \
        pa.table({"stage": pa.array([], pa.int64()), "method": pa.array([], pa.string())})


def view_names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                      "AND NOT starts_with(view_name, '_') ORDER BY view_name").fetchall()]


def _allowed(con) -> str:
    return (f"`mates query` runs one read-only SELECT over the run's views "
            f"({', '.join(view_names(con)) or 'none yet'})")


def query(run_url: str, sql: str, data_url: str | None = None):
    """Run one SELECT over the run's views; an Arrow table back, errors as MatesError.

    A refusal says what was refused (a statement kind, a file read outside the run) and what is
    allowed (one SELECT over the views this run has)."""
    con = open_run(run_url, data_url)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise MatesError(f"`SQL` does not parse: {str(exc).strip().splitlines()[0]}") from exc
        if len(statements) != 1:
            raise MatesError(f"`SQL` holds {len(statements)} statements; {_allowed(con)}.")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise MatesError(f"`SQL` is a {kind.name} statement, refused: {_allowed(con)}; it never writes "
                             f"or reconfigures. Save a result with `--csv FILE` or `--parquet FILE`.")
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else None
    except duckdb.Error as exc:
        message = str(exc)
        if "LocalFileSystem" in message or "disabled by configuration" in message:
            raise MatesError(f"`SQL` reads a file outside the run, refused: {_allowed(con)}, not files "
                             f"(local or remote).") from exc
        if "extension" in message.lower() and ("autoload" in message.lower() or "not loaded" in message):
            raise MatesError(f"`SQL` reads a remote file or URL outside the run (DuckDB extensions are "
                             f"off), refused: {_allowed(con)}, not files or URLs.") from exc
        raise MatesError(f"`SQL` failed: {message.strip().splitlines()[0]}") from exc
    finally:
        con.close()
