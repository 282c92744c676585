"""A boundary's catalog read touches only the columns and row groups it needs (asserted on the
bytes read, not on time)."""
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.store import catalog as catalog_mod
from curation.store.catalog import read_catalog
from schemas import tables
from schemas.storage import Store


class _Recording(io.RawIOBase):
    """A file that records every (offset, length) read from it."""

    def __init__(self, path: str, reads: list):
        self._f, self.reads = open(path, "rb"), reads

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, buffer):
        at = self._f.tell()
        n = self._f.readinto(buffer)
        self.reads.append((at, n))
        return n

    def close(self):
        self._f.close()
        super().close()


def _table(n: int, rng) -> pa.Table:
    return tables.conform(pa.table({
        "sample_id": np.arange(n, dtype=np.int64), "doc_id": [f"d{i // 3}" for i in range(n)],
        "chunk": np.arange(n, dtype=np.int32) % 3, "shard": np.zeros(n, np.int32),
        "index_in_shard": np.arange(n, dtype=np.int32), "n_tokens": np.full(n, 64, np.int32),
        "source": [("wiki", "web", "code")[i % 3] for i in range(n)],
        "text_sha1": [rng.bytes(20).hex() for _ in range(n)], "preview": [rng.bytes(60).hex() for _ in range(n)]}),
        tables.CATALOG)


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    """A 5,000-row catalog in 10 row groups of 500 ids each (random previews: ~350 KB, most of it
    the previews, as in a real catalog), and the list its reads land in."""
    table = _table(5000, np.random.default_rng(0))
    os.makedirs(tmp_path / "data" / "catalog")
    path = str(tmp_path / "data" / "catalog" / "samples.parquet")
    pq.write_table(table, path, row_group_size=500, compression="zstd")
    reads: list = []
    monkeypatch.setattr(Store, "open_read", lambda self, *parts, block_size=0: _Recording(self.path(*parts), reads))
    return str(tmp_path / "data"), path, table, reads


def _chunk_ranges(path: str, column: str) -> list[tuple[int, int, int]]:
    """(row group, first byte, end byte) of every chunk of `column`."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.to_arrow_schema().get_field_index(column)
    out = []
    for g in range(meta.num_row_groups):
        c = meta.row_group(g).column(index)
        start = c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
        out.append((g, start, start + c.total_compressed_size))
    return out


def _body(reads, path):
    """The reads but pyarrow's footer read (the file's last 64 KiB, read before anything else)."""
    size = os.path.getsize(path)
    assert reads[0][0] + reads[0][1] == size and reads[0][1] <= 64 << 10
    return reads[1:]


def _overlaps(reads, lo, hi) -> bool:
    return any(at < hi and lo < at + n for at, n in reads if n)


def test_audit_read_projects_columns_and_prunes_row_groups_by_id(catalog):
    data, path, table, reads = catalog
    ids = np.array([630, 670, 999, 2420, 2555])   # row groups 1, 4 and 5 only
    out = read_catalog(data, ["source"], ids=ids)
    assert out.column_names == ["sample_id", "source"]
    assert out.column("sample_id").to_pylist() == ids.tolist()
    assert out.column("source").to_pylist() == [("wiki", "web", "code")[i % 3] for i in ids]
    assert catalog_mod.row_groups_for(pq.ParquetFile(path).metadata, np.sort(ids)) == [1, 4, 5]
    size, body = os.path.getsize(path), _body(reads, path)
    # never a byte of the big string columns; the small ones between sample_id and source may ride
    # along in one coalesced read (pyarrow merges ranges across holes under 8 KiB: fewer GETs)
    for column in ("preview", "text_sha1"):
        for g, lo, hi in _chunk_ranges(path, column):
            assert not _overlaps(body, lo, hi), (column, g)
    for column in ("sample_id", "source"):   # these only in the row groups that hold a wanted id
        for g, lo, hi in _chunk_ranges(path, column):
            assert _overlaps(body, lo, hi) == (g in (1, 4, 5)), (column, g)
    assert sum(n for _, n in body) < 0.04 * size   # 3 of 10 row groups x the small columns


def test_whole_columns_without_ids_and_a_missing_column_is_one_line(catalog):
    from schemas.errors import MatesError

    data, path, table, reads = catalog
    out = read_catalog(data, ["source"])
    assert out.num_rows == 5000 and out.column("source").equals(table.column("source"))
    body = _body(reads, path)
    for g, lo, hi in _chunk_ranges(path, "preview"):
        assert not _overlaps(body, lo, hi)
    assert sum(n for _, n in body) < 0.15 * os.path.getsize(path)
    with pytest.raises(MatesError, match="has no column 'topic'"):
        read_catalog(data, ["topic"], ids=[1])


def test_catalog_parts_a_file_without_a_wanted_id_costs_its_footer(tmp_path, monkeypatch):
    """A pool's catalog in 3 files (one per pool part): ids of the middle one read its chunks
    only; the others give their footer and nothing more. Rows come back in id order."""
    table = _table(3000, np.random.default_rng(1))
    folder = tmp_path / "data" / "catalog"
    os.makedirs(folder)
    for part in range(3):   # part-00010 sorts after part-00002 by number, as the files go
        rows = table.slice(1000 * part, 1000)
        pq.write_table(rows, str(folder / f"part-{(0, 2, 10)[part]:05d}.parquet"), row_group_size=250)
    reads: dict = {}
    monkeypatch.setattr(Store, "open_read", lambda self, *parts, block_size=0:
                        _Recording(self.path(*parts), reads.setdefault(parts[-1], [])))
    assert catalog_mod.catalog_names(str(tmp_path / "data")) == \
        ["part-00000.parquet", "part-00002.parquet", "part-00010.parquet"]
    out = read_catalog(str(tmp_path / "data"), ["source"], ids=[1600, 1100, 1999])
    assert out.column("sample_id").to_pylist() == [1100, 1600, 1999]
    for name in ("part-00000.parquet", "part-00010.parquet"):   # the footer read, nothing else
        assert len(reads[name]) == 1 and len(_body(reads[name], str(folder / name))) == 0
    assert len(_body(reads["part-00002.parquet"], str(folder / "part-00002.parquet"))) > 0
    assert read_catalog(str(tmp_path / "data"), None).equals(table)
