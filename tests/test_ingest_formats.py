"""Ingest of real-corpus shapes: compressed and Parquet inputs, many files, 1 vs 2 ranks; bad input."""
import gzip
import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.data.ingest import ingest
from curation.store.catalog import catalog_names, read_catalog
from schemas.errors import MatesError
from schemas.recipe import IngestConfig, TokenizerConfig
from tests.conftest import ROOT, free_port, mates
from tests.test_ingest import _assert_nothing_left, _assert_one_line_failure

CFG = IngestConfig(seq_len=64, min_tokens=8, shard_size_limit=1 << 16)  # several shards per part
TOK = TokenizerConfig(vocab_size=400)
N_FILES = 3


def _records(micro_corpus: str) -> list[dict]:
    with open(os.path.join(micro_corpus, "corpus.jsonl"), "rb") as handle:
        return [json.loads(line) for line in handle][:240]


def _write(records: list[dict], path: str) -> None:
    """The same records in the format that `path`'s suffix names."""
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=25)  # many row groups
        return
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".zst"):
        import zstandard

        # two frames, as pzstd writes them: the reader must go on across frames
        half = len(data) // 2
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
    with open(path, "wb") as handle:
        handle.write(data)


def _corpus(tmp_path, records: list[dict], suffix: str) -> str:
    folder = tmp_path / f"corpus{suffix.replace('.', '-')}"
    folder.mkdir()
    per = len(records) // N_FILES
    for i in range(N_FILES):
        _write(records[i * per:(i + 1) * per], str(folder / f"part-{i}{suffix}"))
    return str(folder)


def _pool_digest(data: str) -> dict[str, str]:
    """sha1 of every file of the pool and catalog (the tokenizer too)."""
    out = {}
    for sub in ("pool", "catalog", "tokenizer"):
        for dirpath, _, names in os.walk(os.path.join(data, sub)):
            for name in names:
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, data)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


def test_every_format_ingests_to_the_same_pool(micro_corpus, tmp_path):
    records = _records(micro_corpus)
    digests = {}
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
        data = str(tmp_path / f"data{suffix}")
        summary = ingest(_corpus(tmp_path, records, suffix), data, cfg=CFG, tokenizer_cfg=TOK)
        assert summary.documents == len(records) // N_FILES * N_FILES
        digests[suffix] = _pool_digest(data)
    shards = [k for k in digests[".jsonl"] if k.endswith(".mds")]
    assert len(shards) > N_FILES  # several shards in each of the 3 parts
    assert sorted({k.split("/")[1] for k in shards}) == ["part-00000", "part-00001", "part-00002"]
    for suffix, digest in digests.items():
        assert digest == digests[".jsonl"], suffix


def _launch(n: int, input_url: str, data: str) -> subprocess.CompletedProcess:
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    args = ["ingest", "--input", input_url, "--data", data, "--seq-len", "64", "--vocab-size", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([composer, "-n", str(n), "--master_port", str(free_port()), "-m", "jobs.cli", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_one_and_two_ranks_write_the_same_pool(micro_corpus, tmp_path):
    """Under the launcher (gloo), 2 ranks split the files; ids, catalog rows and bytes match 1 rank."""
    corpus = _corpus(tmp_path, _records(micro_corpus), ".jsonl.gz")
    pools = {1: str(tmp_path / "data-1"), 2: str(tmp_path / "data-2")}
    # one rank in this process (the launcher's 1-rank path is the same call with Ranks())
    ingest(corpus, pools[1], cfg=IngestConfig(seq_len=64), tokenizer_cfg=TOK)
    result = _launch(2, corpus, pools[2])
    assert result.returncode == 0, result.stderr[-3000:]
    catalog = [read_catalog(pools[n], None) for n in (1, 2)]
    assert catalog_names(pools[2]) == [f"part-{i:05d}.parquet" for i in range(N_FILES)]  # one per part
    assert catalog[0].column("sample_id").to_pylist() == list(range(catalog[0].num_rows))
    assert catalog[0].equals(catalog[1])
    index = json.load(open(os.path.join(pools[2], "pool", "index.json")))
    assert sum(s["samples"] for s in index["shards"]) == catalog[0].num_rows
    assert _pool_digest(pools[1]) == _pool_digest(pools[2])  # shards, index.json, catalog, tokenizer
    marker = json.load(open(os.path.join(pools[2], "_SUCCESS")))
    assert marker["summary"]["sequences"] == catalog[0].num_rows
    assert not os.path.exists(os.path.join(pools[2], "_ingest"))  # no scratch left in the pool


def test_truncated_gzip_is_one_line_naming_the_file(micro_corpus, tmp_path):
    corpus = _corpus(tmp_path, _records(micro_corpus), ".jsonl.gz")
    path = os.path.join(corpus, "part-1.jsonl.gz")
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    out = str(tmp_path / "data")
    result = mates("ingest", "--input", corpus, "--data", out, "--vocab-size", "300")
    _assert_one_line_failure(result, "part-1.jsonl.gz", "truncated")
    _assert_nothing_left(out)
    assert not os.path.exists(os.path.join(out, "tokenizer"))


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".parquet"])
def test_damaged_compressed_or_parquet_file_is_one_line(micro_corpus, tmp_path, suffix):
    corpus = _corpus(tmp_path, _records(micro_corpus), suffix)
    path = os.path.join(corpus, f"part-2{suffix}")
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) - 40])  # zstd: cut inside the last frame; Parquet: its footer
    out = str(tmp_path / "data")
    with pytest.raises(MatesError) as err:
        ingest(corpus, out, cfg=CFG, tokenizer_cfg=TOK)
    assert f"part-2{suffix}" in str(err.value) and "\n" not in str(err.value)
    _assert_nothing_left(out)


def test_a_record_error_inside_gzip_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"body": "no text"}\n'))
    result = mates("ingest", "--input", str(path), "--data", str(tmp_path / "data"), "--vocab-size", "300")
    _assert_one_line_failure(result, "bad.jsonl.gz:2", "`text`")


def test_compressed_parts_stream_from_s3(micro_corpus, tmp_path, bucket):
    """A bucket of .jsonl.zst parts, read as streams through s3fs, gives the local pool's bytes."""
    import boto3

    from schemas.storage import join, store_for

    records = _records(micro_corpus)
    local = _corpus(tmp_path, records, ".jsonl.zst")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for name in sorted(os.listdir(local)):
        client.upload_file(os.path.join(local, name), bucket[len("s3://"):], f"corpus/{name}")
    ingest(local, str(tmp_path / "data-local"), cfg=CFG, tokenizer_cfg=TOK)
    data = join(bucket, "data")
    ingest(join(bucket, "corpus"), data, cfg=CFG, tokenizer_cfg=TOK)
    store = store_for(data)
    remote = {rel: hashlib.sha1(store.read_bytes(rel)).hexdigest() for rel in store.walk_files()
              if rel.split("/")[0] in ("pool", "catalog", "tokenizer")}
    assert remote == _pool_digest(str(tmp_path / "data-local"))


def test_each_pool_part_gets_its_own_catalog_file_and_every_reader_sees_them_all(micro_corpus, tmp_path):
    """2 input files -> catalog/part-00000.parquet and part-00001.parquet, each written by its own
    part's rank: together the pool's rows (consecutive ids; `shard` numbered as in the merged
    index.json), read whole by `read_catalog` and `mates query`'s `samples`; a pool of the old
    layout (one catalog/samples.parquet of the same rows) reads the same."""
    import numpy as np

    from curation.store.run_views import query

    folder = tmp_path / "corpus"
    folder.mkdir()
    records = _records(micro_corpus)
    for i in range(2):
        _write(records[i * 120:(i + 1) * 120], str(folder / f"part-{i}.jsonl"))
    data = str(tmp_path / "data")
    summary = ingest(str(folder), data, cfg=CFG, tokenizer_cfg=TOK)
    assert catalog_names(data) == ["part-00000.parquet", "part-00001.parquet"]
    parts = [pq.read_table(os.path.join(data, "catalog", n)) for n in catalog_names(data)]
    rows = pa.concat_tables(parts)
    assert rows.column("sample_id").to_pylist() == list(range(summary.sequences))
    shards = json.load(open(os.path.join(data, "pool", "index.json")))["shards"]
    assert len(shards) > 2                                     # several shards per part
    for file, part in enumerate(parts):
        for shard in np.unique(part["shard"]):
            inside = np.sort(part.filter(pa.compute.equal(part["shard"], shard))["index_in_shard"])
            assert shards[shard]["raw_data"]["basename"].startswith(f"part-{file:05d}/")
            assert inside.tolist() == list(range(shards[shard]["samples"]))
    assert read_catalog(data, None).equals(rows)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(f"data: {data}\n")
    seen = "SELECT count(*) AS n, count(DISTINCT sample_id) AS ids, max(sample_id) AS top FROM samples"
    want = [{"n": rows.num_rows, "ids": rows.num_rows, "top": rows.num_rows - 1}]
    assert query(str(run), seen, data_url=data).to_pylist() == want
    old = tmp_path / "old"                                      # the layout before catalog parts
    (old / "catalog").mkdir(parents=True)
    pq.write_table(rows, old / "catalog" / "samples.parquet", row_group_size=100)
    assert catalog_names(str(old)) == ["samples.parquet"]
    assert read_catalog(str(old), ["source"], ids=[3, 150]).to_pylist() == \
        rows.select(["sample_id", "source"]).take([3, 150]).to_pylist()
    assert query(str(run), seen, data_url=str(old)).to_pylist() == want
