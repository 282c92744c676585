"""`mates bench scale` at a tiny size: the synthetic pool is real MDS, the store's byte counter
counts what is read through it, and one boundary writes every figure the bench promises."""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest


def test_synthetic_shards_are_what_mdswriter_writes(tmp_path):
    from streaming import MDSWriter

    from jobs.bench_scale_data import write_pool

    shards = write_pool(str(tmp_path / "mine"), 300, seq_len=64, shard_bytes=10_000, part_samples=1 << 20,
                        rng=np.random.default_rng(1))
    rng, per = np.random.default_rng(1), shards[0]["samples"]
    with MDSWriter(out=str(tmp_path / "ref"), columns={"tokens": "ndarray:uint16", "sample_id": "int64"},
                   compression=None, hashes=["sha1"], size_limit=10_000) as writer:
        for lo in range(0, 300, per):           # the same tokens, drawn shard by shard as write_pool does
            tokens = rng.integers(1, 512, (min(per, 300 - lo), 64), dtype=np.uint16)
            for j, row in enumerate(tokens):
                writer.write({"tokens": row, "sample_id": lo + j})
    ref = json.loads((tmp_path / "ref" / "index.json").read_text())["shards"]
    assert len(ref) == len(shards) > 1
    assert json.loads((tmp_path / "mine" / "part-00000" / "index.json").read_text())["shards"] == ref
    for shard in ref:
        name = shard["raw_data"]["basename"]
        assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "mine" / "part-00000" / name, shallow=False)


def test_store_counts_bytes_read_through_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.store.catalog import read_catalog
    from schemas.storage import bytes_read, read_parquet, reset_reads, store_for, write_parquet

    store = store_for(str(tmp_path))
    store.write_bytes(b"x" * 1000, "blob")
    reset_reads()
    assert store.read_bytes("blob") == b"x" * 1000 and bytes_read() == 1000
    with store.open_read("blob") as stream:
        stream.read(10)
    assert bytes_read() == 1010
    store.get_file(str(tmp_path / "copy"), "blob")
    assert reset_reads() == {str(tmp_path / "blob"): 2010}
    write_parquet(pa.table({"a": [1, 2, 3]}), str(tmp_path), "t.parquet")
    read_parquet(str(tmp_path), "t.parquet")
    assert bytes_read() == os.path.getsize(tmp_path / "t.parquet")
    # pyarrow's ranged reads of the catalog through `open_read`: what they fetch, not the file
    n = 200_000
    (tmp_path / "catalog").mkdir()
    pq.write_table(pa.table({"sample_id": np.arange(n), "source": ["web"] * n, "x": np.random.rand(n)}),
                   tmp_path / "catalog" / "samples.parquet", row_group_size=20_000)
    reset_reads()
    assert read_catalog(str(tmp_path), ["source"], ids=[5, 15]).num_rows == 2
    assert 0 < bytes_read() < os.path.getsize(tmp_path / "catalog" / "samples.parquet") / 4


def test_bench_scale_tiny_writes_every_figure(tmp_path):
    from jobs.bench_scale import bench_scale, parse_count, parse_methods
    from schemas.errors import MatesError

    assert parse_count("1e5", "--sizes") == 100_000 and parse_methods("mates@frozen") == ["mates@frozen"]
    with pytest.raises(MatesError, match="--methods"):
        parse_methods("mates@finetune")
    out = tmp_path / "scale.json"
    result = bench_scale([2000], 500, ["mates@frozen"], scratch=str(tmp_path / "scratch"), out=str(out),
                         n_probes=40, log=lambda m: None)
    assert json.loads(out.read_text()) == result
    row, = result["rows"]
    assert row["n"] == 2000 and row["candidates"] == 500 and row["selected"] == 250
    assert row["candidate_bytes"] == 500 * (64 * 2 + 384 * 2)
    assert row["peak_rss_mb"] > 100 and row["rss_by_phase_mb"][-1]["line"] == "index written"
    assert {"probe", "fit", "score", "index", "curation", "wall"} <= set(row["seconds"])
    # the fp16 store (2,000 x 768 bytes, zstd) is read through the store layer; rchar sees at least as much
    assert row["store_bytes_by_folder"]["data/embeddings"] > 2000 * 768 * 0.8
    assert row["syscall_bytes_read"] >= row["store_bytes_read"] > 0
    assert row["store_read_ratio"] == round(row["store_bytes_read"] / row["candidate_bytes"], 3)
    assert result["verdicts"]["read_ratio_max"]["store"] == row["store_read_ratio"]
    assert len(row["load_average_before"]) == 3 and result["data"][0]["bytes"]["embeddings"] > 0
    # a second run reuses the generated folder (its stamp matches)
    again = bench_scale([2000], 500, [], scratch=str(tmp_path / "scratch"), out=None, log=lambda m: None)
    assert again["data"][0]["reused"] and again["rows"] == []


def test_verdicts_fail_on_growth_and_on_a_failed_boundary():
    from jobs.bench_scale import verdicts

    rows = [{"n": 10, "method": "m", "peak_rss_mb": 100.0, "store_read_ratio": 1.2, "syscall_read_ratio": 1.4},
            {"n": 100, "method": "m", "peak_rss_mb": 120.0, "store_read_ratio": 1.4, "syscall_read_ratio": 2.0}]
    v = verdicts(rows)
    assert v["rss_ratio"] == {"m": 1.2} and v["rss_pass"] and v["reads_pass"] and v["read_ratio_max"]["store"] == 1.4
    rows[1] = {"n": 100, "method": "m", "peak_rss_mb": 900.0, "failed": "exit 1: MemoryError"}
    v = verdicts(rows)
    assert v["rss_ratio"] == {"m": 9.0} and not v["rss_pass"] and not v["reads_pass"] and len(v["failed"]) == 1
