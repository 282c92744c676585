"""Ingest: demo corpus -> MDS pool + catalog, locally and on the S3 server; bad input."""
import hashlib
import json
import os

import numpy as np
import pytest

from curation.data.demo_corpus import demo_set_files
from curation.data.ingest import ingest
from curation.data.pool_parts import slice_bounds
from curation.data.tokenizer import EOS, load_pool_tokenizer
from curation.store.catalog import catalog_names, read_catalog
from schemas.recipe import IngestConfig, TokenizerConfig
from schemas.storage import join, store_for
from tests.conftest import mates

CFG = IngestConfig(seq_len=64, min_tokens=8)
TOK = TokenizerConfig(vocab_size=512)


def _ingest(corpus: str, data_url: str, **kw):
    targets, evals = demo_set_files(corpus)
    return ingest(os.path.join(corpus, "corpus.jsonl"), data_url, cfg=CFG, tokenizer_cfg=TOK,
                  targets=targets, evals=evals, **kw)


@pytest.fixture(scope="module")
def local_pool(micro_corpus, tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    summary = _ingest(micro_corpus, data)
    return data, summary


def test_slice_bounds_keep_full_slices_and_drop_short_tails():
    assert slice_bounds(21, seq_len=8, min_tokens=4) == ([0, 8, 16], 0)   # 21 ids with EOS: 8 + 8 + 5
    assert slice_bounds(21, seq_len=8, min_tokens=6) == ([0, 8], 1)       # ... which min_tokens=6 drops
    assert slice_bounds(3, seq_len=8, min_tokens=4) == ([], 1)            # a document under min_tokens
    assert slice_bounds(16, seq_len=8, min_tokens=8) == ([0, 8], 0)


def test_catalog_matches_index_and_pool(local_pool):
    data, summary = local_pool
    index = json.loads(open(os.path.join(data, "pool", "index.json")).read())
    assert catalog_names(data) == ["part-00000.parquet"]       # one catalog file per pool part
    catalog = read_catalog(data, None)
    assert catalog.num_rows == sum(s["samples"] for s in index["shards"]) == summary.sequences
    assert catalog.column("sample_id").to_pylist() == list(range(catalog.num_rows))
    assert sum(summary.per_source.values()) == summary.sequences
    assert set(summary.per_source) == {"wiki_en", "wiki_es", "wiki_fr", "bbc_news", "shuffled", "spam",
                                       "char_noise", "near_dup"}
    assert json.loads(open(os.path.join(data, "_SUCCESS")).read())["summary"]["tokens"] == summary.tokens


def test_ingest_is_deterministic(micro_corpus, local_pool, tmp_path):
    data, _ = local_pool
    _ingest(micro_corpus, str(tmp_path))
    for rel in ("pool/index.json", "pool/part-00000/shard.00000.mds", "catalog/part-00000.parquet", "tokenizer/tokenizer.json"):
        a, b = open(os.path.join(data, rel), "rb").read(), open(os.path.join(tmp_path, rel), "rb").read()
        assert hashlib.sha1(a).digest() == hashlib.sha1(b).digest(), rel


def test_s3_ingest_reads_back_through_streaming(micro_corpus, bucket, tmp_path):
    """Every sample read through StreamingDataset(remote=s3://...) equals a direct tokenization."""
    from streaming import StreamingDataset

    data = join(bucket, "data")
    _ingest(micro_corpus, data)
    tok = load_pool_tokenizer(data)
    eos = tok.token_to_id(EOS)
    docs = {d["id"]: d["text"] for d in map(json.loads, open(os.path.join(micro_corpus, "corpus.jsonl")))}
    catalog = read_catalog(data, None).to_pylist()
    dataset = StreamingDataset(remote=join(data, "pool"), local=str(tmp_path / "cache"), shuffle=False,
                               batch_size=1)
    assert len(dataset) == len(catalog)
    direct_cache: dict = {}
    for i in range(len(dataset)):
        sample, row = dataset[i], catalog[i]
        assert int(sample["sample_id"]) == row["sample_id"] == i
        if row["doc_id"] not in direct_cache:
            direct_cache = {row["doc_id"]: tok.encode(docs[row["doc_id"]]).ids + [eos]}
        ids = direct_cache[row["doc_id"]]
        expected = ids[row["chunk"] * CFG.seq_len:(row["chunk"] + 1) * CFG.seq_len]
        np.testing.assert_array_equal(sample["tokens"], np.asarray(expected, dtype=np.uint16))
        assert row["n_tokens"] == len(expected)


def test_duckdb_counts_sources_over_s3(micro_corpus, bucket):
    import duckdb
    import s3fs

    data = join(bucket, "data")
    summary = _ingest(micro_corpus, data)
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]}))
    rows = con.execute(f"SELECT source, count(*) FROM read_parquet('{data}/catalog/part-*.parquet') "
                       f"GROUP BY source ORDER BY source").fetchall()
    assert dict(rows) == summary.per_source


# ---------------------------------------------------------------- bad input via the CLI
def _assert_one_line_failure(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mates: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _assert_nothing_left(data_url):
    store = store_for(data_url)
    assert not store.exists("pool", "index.json") and not store.listdir("catalog")
    assert not store.exists("_SUCCESS")


@pytest.mark.parametrize("content, needle", [
    (b'{"id": "a", "text": "fine text here"}\n{"id": "b", "body": "no text"}\n', "bad.jsonl:2"),
    (b'{"id": "a", "text": "caf\xe9 in latin-1"}\n', "not valid UTF-8"),
    (b"", "no documents"),
    (b'{"id": "a", "text": "ok"\n', "not valid JSON"),
])
def test_bad_input_file(tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    data = str(tmp_path / "data")
    result = mates("ingest", "--input", str(bad), "--data", data, "--vocab-size", "300")
    _assert_one_line_failure(result, needle)
    _assert_nothing_left(data)


def test_unreachable_bucket(micro_corpus, s3_server, tmp_path):
    from tests.conftest import free_port

    data = "s3://no-such-bucket/data"
    result = mates("ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--data", data,
                   env={"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"})
    _assert_one_line_failure(result, "s3://no-such-bucket/data")


def test_missing_bucket(micro_corpus, s3_server):
    result = mates("ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--data",
                   "s3://bucket-that-was-never-made/data")
    _assert_one_line_failure(result, "bucket-that-was-never-made")


def test_unknown_recipe_key(micro_corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: /tmp/x\nrun: /tmp/y\ningest:\n  seq_length: 64\n")
    result = mates("ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--recipe", str(recipe))
    _assert_one_line_failure(result, "`ingest.seq_length`")


def test_existing_pool_is_not_overwritten(local_pool, micro_corpus):
    data, _ = local_pool
    before = open(os.path.join(data, "pool", "index.json"), "rb").read()
    result = mates("ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--data", data)
    _assert_one_line_failure(result, "--force")
    assert open(os.path.join(data, "pool", "index.json"), "rb").read() == before


def test_shard_size_is_a_key_with_a_tens_of_mb_default(micro_corpus, local_pool, tmp_path):
    """`--shard-size-limit` (= `ingest.shard_size_limit`) cuts the same samples into more shards,
    each within the bound; the default (64 MiB) holds the micro pool in one shard; a value out of
    range is one line naming the key, before anything is written."""
    from schemas.recipe import load_recipe
    from tests.conftest import MICRO_RECIPE

    assert IngestConfig().shard_size_limit == 64 << 20
    corpus = os.path.join(micro_corpus, "corpus.jsonl")
    small = str(tmp_path / "small")
    result = mates("ingest", "--input", corpus, "--data", small, "--recipe", MICRO_RECIPE,
                   "--shard-size-limit", str(1 << 16))
    assert result.returncode == 0, result.stderr[-2000:]
    default = str(tmp_path / "default")
    assert mates("ingest", "--input", corpus, "--data", default, "--recipe", MICRO_RECIPE).returncode == 0
    shards = {name: json.load(open(os.path.join(d, "pool", "index.json")))["shards"]
              for name, d in (("small", small), ("default", default))}
    assert len(shards["default"]) == 1 and load_recipe(MICRO_RECIPE).ingest.shard_size_limit == 64 << 20
    assert len(shards["small"]) >= 4
    assert all(s["raw_data"]["bytes"] <= 1 << 16 for s in shards["small"])
    assert sum(s["samples"] for s in shards["small"]) == shards["default"][0]["samples"]
    ids = [np.asarray(read_catalog(d, []).column("sample_id")) for d in (small, default)]
    assert np.array_equal(*ids)

    refused = str(tmp_path / "refused")
    result = mates("ingest", "--input", corpus, "--data", refused, "--shard-size-limit", "100")
    _assert_one_line_failure(result, "`ingest.shard_size_limit` must be in [65536, 2147483648]")
    assert not os.path.exists(refused)
