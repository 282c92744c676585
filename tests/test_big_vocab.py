"""A 70,000-entry tokenizer end to end: `mates ingest --tokenizer` stores uint32 tokens (stamped
`token_dtype`), and a Llama micro run trains two stages over it with a `mates` boundary between
them, then `mates report` draws it (issue 23's must-show)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curation.data.demo_corpus import demo_set_files
from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, mates

pytestmark = pytest.mark.slow
VOCAB = 70_000
# common words, added last so their ids are above 65,535 (those the BPE lacks as a token)
COMMON = ["the", "and", "of", "in", "to", "was", "for", "with", "that", "is", "on", "as", "by", "his", "from"]


@pytest.fixture(scope="module")
def big_tokenizer(micro_corpus, tmp_path_factory) -> str:
    """A byte-level BPE of 512 entries grown to 70,000 with added tokens (fillers, then common
    words, so the pool really holds ids that do not fit in uint16)."""
    from curation.data.tokenizer import train_bpe

    with open(os.path.join(micro_corpus, "corpus.jsonl")) as handle:
        texts = [json.loads(line)["text"] for line in handle]
    tok = train_bpe(texts, 512)
    words = [w for w in COMMON if tok.token_to_id(w) is None][:5]
    tok.add_tokens([f"<filler{i:05d}>" for i in range(VOCAB - tok.get_vocab_size() - len(words))])
    tok.add_tokens(words)
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(words[0]) == VOCAB - len(words)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_llama_run_over_a_70k_tokenizer_end_to_end(micro_corpus, big_tokenizer, tmp_path):
    from curation.store.pool import MDSFolder

    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    targets, evals = demo_set_files(micro_corpus)
    sets = [a for name, f in targets.items() for a in ("--target", f"{name}={f}")] + \
        [a for name, f in evals.items() for a in ("--eval", f"{name}={f}")]
    result = mates("ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--data", data,
                   "--recipe", MICRO_RECIPE, "--tokenizer", big_tokenizer, *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    marker = json.loads(store_for(data).read_bytes("_SUCCESS"))
    assert (marker["vocab_size"], marker["token_dtype"]) == (VOCAB, "uint32")
    pool = MDSFolder(join(data, "pool"))
    assert pool.columns()["tokens"] == "ndarray:uint32"
    tokens = [pool[i]["tokens"] for i in range(200)]
    assert tokens[0].dtype == np.uint32 and max(int(t.max()) for t in tokens) >= VOCAB - 5

    # first-order probes, batches of 4 and 200 candidates a stage: what keeps a 70,000-way softmax
    # on 2 CPU cores near a minute (exact probes and batches of 8 took ~100 s)
    options = ("stages.options={probe_method: first_order, n_probes: 24, probe_batch: 8, encoder_layers: 1, encoder_max_len: 32, "
               "epochs: 1, max_target: 8, batch_size: 16}")
    result = mates("run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}", "--set", "model.name=llama",
                   "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "stages.batches=[6, 4]",
                   "--set", "stages.method=mates", "--set", options, "--set", "stages.pool_per_stage=200",
                   "--set", "train_loader.batch_size=4", "--set", "eval.max_examples=16",
                   "--set", "eval.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_parquet(run, "metrics.parquet").to_pylist()
    wiki = [m for m in metrics if m["eval_set"] == "wiki_en"]
    assert [m["stage"] for m in wiki] == [-1, 0, 1] and wiki[-1]["batches_seen"] == 10
    assert wiki[-1]["loss"] < wiki[0]["loss"]  # ln(70,000) = 11.16 at the start
    stage = join(run, "stages", "1")
    assert json.loads(store_for(stage).read_bytes("_SUCCESS"))["method"] == "mates"
    assert read_parquet(stage, "probes.parquet").num_rows == 24
    # the stage index keeps the pool's uint32 tokens, sample for sample
    bucket = json.loads(store_for(stage).read_bytes("index", "streams.json"))["streams"][0]["name"]
    index = MDSFolder(join(stage, "index", bucket))
    assert index.columns()["tokens"] == "ndarray:uint32"
    first = index[0]
    np.testing.assert_array_equal(first["tokens"], pool[int(first["sample_id"])]["tokens"])

    result = mates("report", run, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(tmp_path / "report" / "index.html") > 0


def test_a_tokenizer_without_endoftext_gets_it(tmp_path):
    """Any tokenizer.json loads: Llama 3's ends text with <|end_of_text|>, so ours is added."""
    from tokenizers import Tokenizer, models

    from curation.data.tokenizer import EOS, load_tokenizer_file

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer_file(str(tmp_path))
    assert tok.token_to_id(EOS) == 3 and tok.get_vocab_size() == 4
