"""The metadata side of Group-MATES in DuckDB (DESIGN.md 2.4): cluster statistics, quotas, dedup,
per-cluster top-k and the selection manifest.

The queries live in `curation/select/sql/*.sql`, one readable file each, over fixed view names (`scores`,
`catalog`, `quotas`, `picked`) and DuckDB named parameters (`$budget`, ...). Every function here
binds its inputs to those views, runs one file and returns an Arrow table. An input is either an
Arrow table (registered zero-copy), the URL of a Parquet object (a local path, `file://` or
`s3://`, read by DuckDB itself; globs such as `.../scores/part-*.parquet` work too) or a list of
such URLs (a pool's catalog files, curation/store/catalog.py `catalog_files`).

S3 goes through the same s3fs filesystem as `schemas.storage` (endpoint from the standard AWS
variables), registered on the connection, so no DuckDB extension has to be downloaded.
"""
from __future__ import annotations

import functools
from importlib import resources

import duckdb
import numpy as np
import pyarrow as pa

from schemas import tables
from schemas.errors import MatesError
from schemas.shared_reads import for_duckdb
from schemas.storage import store_for

Source = pa.Table | str | list   # an Arrow table, the URL of Parquet object(s), or a list of URLs
QUOTA_MODES = ("size", "influence")


@functools.cache
def sql(name: str) -> str:
    """The text of `curation/select/sql/<name>.sql`."""
    return resources.files("curation.select").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def _ensure_s3(con: duckdb.DuckDBPyConnection, url: str) -> None:
    if not con.filesystem_is_registered("s3"):
        # s3fs (endpoint from schemas.storage.s3_endpoint()), its read handles safe for DuckDB's threads
        con.register_filesystem(for_duckdb(store_for(url).fs))


def connect(*urls: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that can read every URL given (s3fs when one is s3://)."""
    con = duckdb.connect()
    for url in urls:
        if url.startswith("s3://"):
            _ensure_s3(con, url)
    return con


def _bind(con: duckdb.DuckDBPyConnection, name: str, source: Source) -> None:
    """Make view `name` show `source`, replacing whatever that name showed before."""
    con.unregister(name)
    con.execute(f"DROP VIEW IF EXISTS {name}")
    if isinstance(source, pa.Table):
        con.register(name, source)
        return
    urls = source if isinstance(source, list) else [source]
    if not urls or not all(isinstance(u, str) for u in urls):
        raise MatesError(f"`{name}` must be an Arrow table, a Parquet URL or a non-empty list of them; "
                         f"got {type(source).__name__}.")
    try:
        con.read_parquet([_duckdb_path(con, u) for u in urls]).create_view(name, replace=True)
    except duckdb.Error as exc:
        raise MatesError(f"`{name}` Parquet {source!r} could not be read: {exc}") from exc


def _duckdb_path(con: duckdb.DuckDBPyConnection, url: str) -> str:
    """What DuckDB reads for `url`: s3:// through the registered s3fs, a local path as a path."""
    if url.startswith("s3://"):
        _ensure_s3(con, url)
        return url
    return store_for(url).root if "*" not in url else url.removeprefix("file://")


def _run(con: duckdb.DuckDBPyConnection, name: str, **params) -> pa.Table:
    return con.sql(sql(name), params=params or None).to_arrow_table()


def _check_catalog(con: duckdb.DuckDBPyConnection, where: str) -> None:
    (missing, example), = con.sql(sql("missing_in_catalog")).fetchall()
    if missing:
        raise MatesError(f"`{where}`: {missing} candidates are not in the sample catalog (e.g. sample_id "
                         f"{example}); score candidates of this data set's catalog only.")


def cluster_stats(con: duckdb.DuckDBPyConnection, scores: Source, catalog_url: Source) -> pa.Table:
    """Per cluster: size, mean/std/min/max prediction, n_sources and `sources` [{source, n, share}]."""
    _bind(con, "scores", scores)
    _bind(con, "catalog", catalog_url)
    _check_catalog(con, "cluster_stats")
    return _run(con, "cluster_stats")


def cluster_quotas(con: duckdb.DuckDBPyConnection, scores: Source, budget: int, mode: str = "size",
                   temperature: float = 1.0) -> pa.Table:
    """Per cluster: size, mean_prediction, log_weight, exact_quota and `quota` (sums to `budget`)."""
    if mode not in QUOTA_MODES:
        raise MatesError(f"`mode` must be one of {list(QUOTA_MODES)}; got {mode!r}.")
    if not temperature > 0:
        raise MatesError(f"`temperature` must be > 0; got {temperature}.")
    _bind(con, "scores", scores)
    (n_rows,), = con.sql("SELECT count(*) FROM scores").fetchall()
    if not 0 <= int(budget) <= n_rows:
        raise MatesError(f"`budget` must be in [0, {n_rows}] (the scored rows); got {budget}.")
    out = _run(con, "quotas", budget=int(budget), mode=mode, temperature=float(temperature))
    if out.num_rows and int(np.sum(out.column("quota"))) != int(budget):   # float rounding guard
        raise RuntimeError(f"quotas sum to {int(np.sum(out.column('quota')))}, not {budget}: a rounding bug.")
    return out


def quotas_dict(quotas: pa.Table) -> dict[int, int]:
    """{cluster: quota} of a `cluster_quotas` table, for `select_per_cluster`."""
    return dict(zip(quotas.column("cluster").to_pylist(), quotas.column("quota").to_pylist()))


def dedup(con: duckdb.DuckDBPyConnection, scores: Source, catalog_url: Source) -> pa.Table:
    """`scores` with one row per catalog `text_sha1` (the lowest prediction), plus text_sha1, copies.

    The rows dropped are `scores` minus these; `copies - 1` of them per kept row.
    """
    _bind(con, "scores", scores)
    _bind(con, "catalog", catalog_url)
    _check_catalog(con, "dedup")
    return _run(con, "dedup")


def top_per_cluster(con: duckdb.DuckDBPyConnection, scores: Source, quotas: Source) -> pa.Table:
    """(sample_id, cluster, prediction) of the `quota` lowest predictions of each cluster."""
    _bind(con, "scores", scores)
    _bind(con, "quotas", quotas)
    return _run(con, "top_per_cluster")


def selection_table(con: duckdb.DuckDBPyConnection, candidates: pa.Table, selected) -> pa.Table:
    """The SELECTION manifest of every candidate (sample_id, cluster) given a boolean mask [N].

    Bucket 'c%03d' of the cluster ('' for cluster -1), weight = the bucket's share of the selected
    samples, sorted by sample_id. Write it with `schemas.storage.write_parquet` (atomic, stamped).
    """
    mask = np.asarray(selected, dtype=bool)
    if mask.shape != (candidates.num_rows,):
        raise MatesError(f"`selected` must be a mask over the {candidates.num_rows} candidates; "
                         f"got shape {mask.shape}.")
    picked = pa.table({"sample_id": candidates.column("sample_id"),
                       "cluster": candidates.column("cluster"), "selected": mask})
    _bind(con, "picked", picked)
    return tables.conform(_run(con, "selection"), tables.SELECTION)
