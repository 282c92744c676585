"""Reading the sample catalog by need: some columns, some ids (DESIGN.md 5, "reads by need").

`<data>/catalog/samples.parquet` holds a row per pool sample, and its `preview` and `text_sha1`
strings are most of its bytes. A boundary needs a column or two of its candidates only, so
`read_catalog` opens the object for ranged reads (S3: GETs of `block_size` bytes) and has
pyarrow read the footer, then only the chunks of the asked columns, in only the row groups
whose `sample_id` statistics (min, max; ingest writes ids in order) can hold a wanted id; the
rows are then filtered on the ids. Before, the boundary's audit downloaded and parsed the whole
object to keep two columns.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import MatesError
from schemas.storage import store_for

ID = "sample_id"
ATTEMPTS = 3     # fs.open's ranged reads have no retry of their own around the size lookup
FOOTER_READ = 64 << 10   # the tail read for the footer (pyarrow's own first read is this size)


def catalog_columns(data_url: str) -> list[str]:
    """The catalog's column names from its footer alone: a size lookup and a ranged read of the
    last 64 KiB (more only when the footer is longer), each retried by the store; a size or tail
    that is not a Parquet footer (a failed lookup has read as 0 bytes under faults) is read again."""
    store, parts = store_for(data_url), ("catalog", "samples.parquet")
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


def read_catalog(data_url: str, columns: list[str], ids=None, *, block_size: int = 1 << 20) -> pa.Table:
    """`columns` (plus `sample_id`) of the catalog rows whose id is in `ids` (None: every row), in
    file order. Only the footer and those columns' chunks of the row groups that can hold an id
    are read."""
    wanted = None if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    store = store_for(data_url)
    names = list(dict.fromkeys([ID, *columns]))
    error = None
    for _ in range(ATTEMPTS):
        try:
            with store.open_read("catalog", "samples.parquet", block_size=block_size) as handle:
                parquet = pq.ParquetFile(handle)
                missing = [c for c in names if c not in parquet.schema_arrow.names]
                if missing:
                    raise MatesError(f"the catalog of {data_url} has no column {missing[0]!r} "
                                     f"(columns: {', '.join(parquet.schema_arrow.names)}).")
                table = parquet.read_row_groups(row_groups_for(parquet.metadata, wanted), columns=names)
            break
        except OSError as exc:
            error = exc
    else:
        raise MatesError(f"`{store.url_of('catalog', 'samples.parquet')}` could not be read: {error}")
    if wanted is not None:
        table = table.filter(pc.is_in(table.column(ID), value_set=pa.array(wanted)))
    return table
