"""Reading the sample catalog by need: some columns, some ids (DESIGN.md 5, "reads by need").

    <data>/catalog/part-<file>.parquet    the catalog rows of pool part `pool/part-<file>/`

Ingest writes one catalog file per pool part (curation/data/pool_parts.py `catalog_file`), each
by the rank that wrote the part: no rank re-reads every part to write one file. Ids are
consecutive in file order, so each file holds one id range. A pool ingested before the parts
has one `catalog/samples.parquet`; `catalog_files` gives it when there are no parts, so every
reader (this module, DuckDB's `read_parquet` over the list, the `samples` query view) takes both.

A row's `preview` and `text_sha1` strings are most of its bytes, and a boundary needs a column or
two of its candidates only. So `read_catalog` opens each file for ranged reads (S3: GETs of
`block_size` bytes) and has pyarrow read its footer, then only the chunks of the asked columns,
in only the row groups whose `sample_id` statistics (min, max) can hold a wanted id: a file
whose ids are all unwanted costs its footer. The rows are then filtered on the ids.
"""
from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.data.pool_parts import CATALOG_FILE
from schemas import tables
from schemas.errors import MatesError
from schemas.storage import join, store_for

ID = "sample_id"
FOLDER = "catalog"
SINGLE = "samples.parquet"   # the one catalog file of a pool ingested before catalog parts
READERS = 16    # catalog files read at once
ATTEMPTS = 3     # fs.open's ranged reads have no retry of their own around the size lookup
FOOTER_READ = 64 << 10   # the tail read for the footer (pyarrow's own first read is this size)


def catalog_names(data_url: str, *, missing_ok: bool = False) -> list[str]:
    """The catalog's file names under `<data>/catalog/`, in id order (see the module docstring);
    no catalog is an error, or [] with `missing_ok`."""
    names = store_for(data_url).listdir(FOLDER)
    parts = sorted((n for n in names if CATALOG_FILE.fullmatch(n)), key=lambda n: int(CATALOG_FILE.fullmatch(n)[1]))
    if parts:
        return parts
    if SINGLE in names:
        return [SINGLE]
    if missing_ok:
        return []
    raise MatesError(f"`{join(data_url, FOLDER)}` holds no catalog (no part-*.parquet nor {SINGLE}); "
                     f"run `mates ingest`.")


def catalog_files(data_url: str) -> list[str]:
    """The URLs of the catalog's files, in id order; DuckDB's `read_parquet` takes the list."""
    return [join(data_url, FOLDER, n) for n in catalog_names(data_url)]


def catalog_columns(data_url: str) -> list[str]:
    """The catalog's column names (every file has the CATALOG schema: the first file's), from its
    footer alone: a size lookup and a ranged read of the last 64 KiB (more only when the footer is
    longer), each retried by the store; a size or tail that is not a Parquet footer (a failed
    lookup has read as 0 bytes under faults) is read again."""
    store, parts = store_for(data_url), (FOLDER, catalog_names(data_url)[0])
    error = None
    for _ in range(ATTEMPTS):
        try:
            size = store.size(*parts)
            tail = store.read_range(*parts, start=max(0, size - FOOTER_READ), end=size)
            if size < 12 or len(tail) < 8 or tail[-4:] != b"PAR1":
                raise ValueError(f"{size} bytes, not ending in a Parquet footer")
            need = struct.unpack("<I", tail[-8:-4])[0] + 8
            if need > len(tail):
                tail = store.read_range(*parts, start=max(0, size - need), end=size)
            # the footer alone, behind the leading magic: enough for pyarrow to read the schema
            return pq.read_schema(io.BytesIO(b"PAR1" + tail[-need:])).names
        except (OSError, ValueError) as exc:   # ArrowInvalid is a ValueError
            error = exc
    raise MatesError(f"`{store.url_of(*parts)}` has no readable Parquet footer: {error}")


def row_groups_for(metadata: pq.FileMetaData, ids: np.ndarray | None) -> list[int]:
    """Row groups whose `sample_id` [min, max] statistics hold at least one of the sorted `ids`."""
    if ids is None:
        return list(range(metadata.num_row_groups))
    column = metadata.schema.to_arrow_schema().get_field_index(ID)
    keep = []
    for g in range(metadata.num_row_groups):
        stats = metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            keep.append(g)            # no statistics: it may hold any id
            continue
        lo = np.searchsorted(ids, stats.min, side="left")
        if lo < len(ids) and ids[lo] <= stats.max:
            keep.append(g)
    return keep


def _read_file(data_url: str, name: str, names: list[str] | None, wanted, block_size: int) -> pa.Table | None:
    """`names` of one catalog file's row groups that can hold a `wanted` id (None: no such group)."""
    store = store_for(data_url)
    error = None
    for _ in range(ATTEMPTS):
        try:
            with store.open_read(FOLDER, name, block_size=block_size) as handle:
                parquet = pq.ParquetFile(handle)
                missing = [c for c in names or [] if c not in parquet.schema_arrow.names]
                if missing:
                    raise MatesError(f"the catalog of {data_url} has no column {missing[0]!r} "
                                     f"(columns: {', '.join(parquet.schema_arrow.names)}).")
                groups = row_groups_for(parquet.metadata, wanted)
                return parquet.read_row_groups(groups, columns=names) if groups else None
        except OSError as exc:
            error = exc
    raise MatesError(f"`{store.url_of(FOLDER, name)}` could not be read: {error}")


def read_catalog(data_url: str, columns: list[str] | None, ids=None, *, block_size: int = 1 << 20) -> pa.Table:
    """`columns` (plus `sample_id`; None: every column) of the catalog rows whose id is in `ids`
    (None: every row), in id order. Of each file only the footer and those columns' chunks of
    the row groups that can hold an id are read."""
    wanted = None if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    names = None if columns is None else list(dict.fromkeys([ID, *columns]))
    files = catalog_names(data_url)
    # a pool has a catalog file per input file (10^2-10^4): their footers are fetched side by
    # side, since one after another a boundary would wait a GET's latency per file
    with ThreadPoolExecutor(max_workers=min(READERS, len(files))) as readers:
        found = readers.map(lambda name: _read_file(data_url, name, names, wanted, block_size), files)
        found = [t for t in found if t is not None]
    if not found:  # no file holds a wanted id
        return tables.CATALOG.empty_table().select(names or tables.CATALOG.names)
    table = pa.concat_tables(found)
    if wanted is not None:
        table = table.filter(pc.is_in(table.column(ID), value_set=pa.array(wanted)))
    return table

