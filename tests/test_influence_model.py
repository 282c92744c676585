"""The influence model (curation/influence/finetuned.py) and pool scoring (curation/influence/scoring.py).

Small on purpose: 1 encoder layer, max_len 32, a few hundred 12-word texts. The signal is
learnable by construction: a text's label is how many times it says "apple", plus noise.
"""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from site-packages

import numpy as np
import pytest
import torch

from curation.influence.finetuned import CONFIG_NAME, InfluenceModel, fit_influence_model
from curation.store.pool import MDSFolder
from curation.influence.scoring import score_samples, shard_for_rank
from jobs.bench_score import bench_score
from schemas.errors import MatesError

WORDS = ("river stone cloud table window garden music paper bridge forest chair candle market "
         "winter letter mountain engine silver harbor lantern").split()
OPTIONS = SimpleNamespace(encoder_max_len=32, encoder_layers=1, epochs=2, lr=3e-4, batch_size=16)


def synthetic(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """12-word texts with k in 0..4 copies of "apple"; label = k + N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        words = [str(w) for w in rng.choice(WORDS, size=12 - k)] + ["apple"] * k
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(k + rng.normal(0.0, 0.5))
    return texts, np.asarray(labels)


@pytest.fixture(scope="module")
def fitted():
    texts, labels = synthetic(300, seed=0)
    lines = []
    model, metrics = fit_influence_model(texts, labels, options=OPTIONS, seed=0, log=lines.append)
    print("\n".join(lines))
    print(f"influence model fit: {metrics}")
    return model, metrics


def test_fit_learns_a_learnable_signal(fitted):
    model, metrics = fitted
    assert metrics["val_spearman"] > 0.3, metrics
    assert (metrics["train_size"], metrics["val_size"], metrics["epochs_run"]) == (270, 30, 2)
    assert metrics["label_std"] > 0 and np.isfinite(metrics["val_mse"]) and metrics["seconds"] > 0
    assert set(metrics) >= {"val_spearman", "val_mse", "train_size", "val_size", "label_mean",
                            "label_std", "seconds", "epochs_run"}
    assert not model.training
    # The token table stays as shipped (freeze_word_embeddings defaults to True); the layers moved.
    fresh = InfluenceModel(layers_kept=1, max_len=32)
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, fresh.encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(model.encoder.encoder.layer[0].output.dense.weight,
                           fresh.encoder.encoder.layer[0].output.dense.weight)


def test_predictions_depend_on_the_text(fitted):
    """Fails if the head ignored its input: fresh texts must rank by their apple count."""
    from scipy.stats import spearmanr

    model, _ = fitted
    texts, labels = synthetic(120, seed=1)
    pred = model.predict_texts(texts)
    rho = spearmanr(pred, labels)[0]
    print(f"spearman on 120 fresh texts: {rho:.3f}")
    assert np.std(pred) > 0.1 and rho > 0.3
    many, none = model.predict_texts(["apple apple apple apple river stone", "river stone cloud table"])
    assert many > none


def test_fit_is_deterministic_for_a_seed_and_leaves_init_unchanged(fitted):
    texts, labels = synthetic(40, seed=2)
    small = SimpleNamespace(**{**vars(OPTIONS), "epochs": 1})
    a, ma = fit_influence_model(texts, labels, options=small, seed=5, log=lambda _: None)
    b, mb = fit_influence_model(texts, labels, options=small, seed=5, log=lambda _: None)
    assert ma["val_spearman"] == mb["val_spearman"] or np.isnan(ma["val_spearman"])
    np.testing.assert_array_equal(a.predict_texts(texts), b.predict_texts(texts))

    init, _ = fitted
    head_before = init.head.weight.detach().clone()
    warm, _ = fit_influence_model(texts, labels, options=small, seed=5, init=init, log=lambda _: None)
    assert torch.equal(init.head.weight, head_before) and warm is not init
    assert not torch.equal(warm.head.weight, head_before)


def test_fit_rejects_bad_input():
    with pytest.raises(MatesError, match="at least"):
        fit_influence_model(["a"] * 5, np.zeros(5), options=OPTIONS, seed=0)
    with pytest.raises(MatesError, match="one number per text"):
        fit_influence_model(["a"] * 20, np.zeros(19), options=OPTIONS, seed=0)
    with pytest.raises(MatesError, match="encoder_layers"):
        InfluenceModel(layers_kept=7)


def test_save_and_load_round_trip(fitted, tmp_path):
    model, _ = fitted
    url = str(tmp_path / "influence_model")
    model.save_pretrained(url)
    assert os.path.exists(os.path.join(url, "encoder", "model.safetensors"))
    assert os.path.exists(os.path.join(url, "encoder", "tokenizer.json"))
    assert os.path.exists(os.path.join(url, "head.safetensors"))
    config = json.loads(open(os.path.join(url, CONFIG_NAME)).read())
    assert (config["layers_kept"], config["max_len"], config["version"]) == (1, 32, 1)

    loaded = InfluenceModel.from_pretrained(url)
    texts, _ = synthetic(50, seed=3)
    np.testing.assert_array_equal(loaded.predict_texts(texts), model.predict_texts(texts))
    assert (loaded.label_mean, loaded.label_std) == (model.label_mean, model.label_std)
    assert len(loaded.encoder.encoder.layer) == 1

    for key, value, message in (("version", 99, "version 99"), ("format", "other", "format")):
        bad = str(tmp_path / f"bad-{key}")
        shutil.copytree(url, bad)
        with open(os.path.join(bad, CONFIG_NAME), "w") as handle:
            json.dump({**config, key: value}, handle)
        with pytest.raises(MatesError, match=message):
            InfluenceModel.from_pretrained(bad)
    with pytest.raises(MatesError, match="not a saved influence model"):
        InfluenceModel.from_pretrained(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    """An MDS pool of 45 samples (pool BPE ids + EOS) and its tokenizer, as ingest writes them."""
    from streaming import MDSWriter

    from curation.data.tokenizer import EOS, train_bpe

    texts, _ = synthetic(45, seed=4)
    tok = train_bpe(texts, 300)
    eos = tok.token_to_id(EOS)
    out = str(tmp_path_factory.mktemp("pool"))
    with MDSWriter(out=out, columns={"tokens": "ndarray:uint16", "sample_id": "int64"},
                   size_limit=1 << 12) as writer:  # small shards: reads cross shard boundaries
        for i, text in enumerate(texts):
            ids = tok.encode(text).ids + [eos]
            writer.write({"tokens": np.asarray(ids, dtype=np.uint16), "sample_id": i})
    return out, tok, texts


def test_score_samples_matches_the_model_on_decoded_text(fitted, tiny_pool):
    model, _ = fitted
    url, tok, texts = tiny_pool
    folder = MDSFolder(url)
    assert len(folder.index["shards"]) > 1
    ids = np.random.default_rng(0).permutation(len(texts))[:30]
    pred = score_samples(model, url, ids, tok, batch_size=7, progress=False)
    assert pred.shape == (30,) and pred.dtype == np.float32
    # The pool's byte-level BPE round-trips the text exactly, EOS dropped.
    direct = model.predict_texts([texts[i] for i in ids])
    np.testing.assert_allclose(pred, direct, rtol=0, atol=1e-5)

    pred2, emb = score_samples(model, folder, ids, tok, batch_size=16, with_embeddings=True, progress=False)
    np.testing.assert_allclose(pred2, pred, rtol=0, atol=1e-5)
    assert emb.shape == (30, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        batch = model.tokenize([texts[i] for i in ids[:4]])
        np.testing.assert_allclose(emb[:4], model.embed(**batch).numpy(), atol=1e-5)
    assert score_samples(model, folder, np.zeros(0, dtype=np.int64), tok, progress=False).shape == (0,)
    with pytest.raises(MatesError, match="outside the pool"):
        score_samples(model, folder, np.array([len(texts)]), tok, progress=False)


def test_shard_for_rank_covers_every_id_once():
    for n in range(0, 12):
        ids = np.arange(100, 100 + n)
        for world in range(1, 6):
            parts = [shard_for_rank(ids, rank, world) for rank in range(world)]
            np.testing.assert_array_equal(np.concatenate(parts), ids)  # contiguous, in order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(MatesError, match="rank"):
        shard_for_rank(np.arange(4), 2, 2)
    with pytest.raises(MatesError, match="world_size"):
        shard_for_rank(np.arange(4), 0, 0)


def test_bench_score_reports_both_paths(fitted, tiny_pool):
    model, _ = fitted
    url, tok, texts = tiny_pool
    result = bench_score(model, url, np.arange(len(texts)), tok, batch_size=16)
    print(f"bench on the tiny pool: {result}")
    assert result["samples"] == len(texts) and result["ratio"] > 0
    assert result["pipeline_samples_per_s"] > 0 and result["encoder_samples_per_s"] > 0
