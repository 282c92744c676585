"""The pool's embedding store (curation/influence/embeddings.py) and the frozen head (curation/influence/frozen_head.py).

Small on purpose: MiniLM cut to 1 layer at max_len 32, a few dozen micro-pool samples, parts of 16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from curation.data.tokenizer import load_pool_tokenizer
from curation.influence.embeddings import STAMP, EmbeddingSettings, EmbeddingStore
from curation.influence.frozen_head import FrozenHead, cross_validated_spearman, fit_frozen_head
from curation.influence.finetuned import InfluenceModel
from curation.store.pool import MDSFolder
from curation.influence.scoring import pool_texts
from schemas.errors import MatesError
from schemas.storage import join, store_for
from tests.conftest import ROOT

SETTINGS = EmbeddingSettings(layers_kept=1, max_len=32)


@pytest.fixture(scope="module")
def encoder():
    return InfluenceModel(layers_kept=1, max_len=32).eval()


def _ensure(data: str, ids, encoder, settings=SETTINGS, **kw):
    store = EmbeddingStore(data, settings, part_size=16)
    stats = store.ensure(ids, pool=MDSFolder(join(data, "pool")), pool_tokenizer=load_pool_tokenizer(data),
                         encoder=encoder, batch_size=8, progress=False, **kw)
    return store, stats


def _direct(data: str, ids, encoder) -> np.ndarray:
    """The encoder's pooled output for each sample alone (no batch, no padding): [N, H]."""
    texts = pool_texts(MDSFolder(join(data, "pool")), np.asarray(ids), load_pool_tokenizer(data))
    with torch.inference_mode():
        return np.stack([encoder.pooled(**encoder.tokenize([t]))[0].numpy() for t in texts])


def test_stored_embedding_equals_the_encoders_pooled_output(local_pool, encoder, tmp_path):
    ids = np.arange(5, 45)
    store, stats = _ensure(local_pool, ids, encoder)
    assert (stats["computed"], stats["reused"], stats["parts_written"]) == (40, 0, 3)
    got = EmbeddingStore(local_pool, SETTINGS).load(ids[::-1])         # a fresh reader, any order
    want = _direct(local_pool, ids[::-1], encoder)
    assert got.shape == (40, 384) and got.dtype == np.float32
    # fp32: equal up to float rounding from batching with padding (masked out of the mean)
    assert np.abs(got - want).max() < 1e-5
    # fp16: within half precision's rounding, 2^-11 relative (plus the fp32 batching error)
    half = EmbeddingSettings(layers_kept=1, max_len=32, dtype="float16")
    _ensure(local_pool, ids, encoder, settings=half)
    got16 = EmbeddingStore(local_pool, half).load(ids[::-1])
    assert got16.dtype == np.float16        # kept fp16: callers upcast a chunk at a time
    assert np.all(np.abs(got16 - want) <= np.abs(want) * 2.0 ** -11 + 1e-5)
    assert np.abs(got16 - want).max() > 0   # it really is stored in half precision
    with pytest.raises(MatesError, match="lacks the embeddings of 1 samples"):
        store.load(np.array([5, 999]))


def test_a_store_of_its_own_computes_what_the_shared_one_already_holds(local_pool, encoder, tmp_path):
    """`embeddings_url`: a run with a store of its own embeds (and pays for) its samples even when
    the pool's shared store holds them, and writes nothing into the shared one."""
    ids = np.arange(0, 20)
    shared, _ = _ensure(local_pool, ids, encoder)
    own = EmbeddingStore(local_pool, SETTINGS, part_size=16, url=str(tmp_path / "run" / "embeddings"))
    assert own.url != shared.url
    stats = own.ensure(ids, pool=MDSFolder(join(local_pool, "pool")), pool_tokenizer=load_pool_tokenizer(local_pool),
                       encoder=encoder, batch_size=8, progress=False)
    assert (stats["computed"], stats["reused"]) == (20, 0) and stats["tokens"] > 0
    assert np.abs(own.load(ids) - shared.load(ids)).max() < 1e-5    # batching with padding: float rounding
    assert os.path.exists(tmp_path / "run" / "embeddings")


def test_a_second_pass_computes_nothing_new_over_s3(s3_pool, encoder):
    ids = np.arange(0, 24)
    _, first = _ensure(s3_pool, ids, encoder)
    assert first["computed"] == 24
    parts = store_for(join(s3_pool, "embeddings", SETTINGS.key)).listdir()
    _, again = _ensure(s3_pool, ids, encoder)
    assert (again["computed"], again["reused"], again["parts_written"], again["seconds"]) == (0, 24, 0, 0.0)
    assert store_for(join(s3_pool, "embeddings", SETTINGS.key)).listdir() == parts
    _, more = _ensure(s3_pool, np.arange(16, 40), encoder)             # only the new 16 are computed
    assert (more["computed"], more["reused"]) == (16, 8)
    # data-parallel: each of 2 ranks embeds its half of the missing ids
    halves = [_ensure(s3_pool, np.arange(40, 60), encoder, rank=r, world_size=2)[1]["computed"] for r in (0, 1)]
    assert halves == [10, 10]  # ranks 0 and 1 each own half of ids 40..59
    assert np.array_equal(EmbeddingStore(s3_pool, SETTINGS).stored_ids(np.arange(99)), np.arange(60))


@pytest.mark.slow
def test_killed_pass_resumes_without_recomputing_finished_parts(local_pool, tmp_path, encoder):
    """`mates embed` SIGKILLed after its first part; the next pass computes only the rest."""
    import shutil

    from tests.conftest import mates, mates_process

    data = str(tmp_path / "data")  # a copy of the pool, so the store starts empty
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    opts = "stages.options={encoder_layers: 1, encoder_max_len: 32}"
    args = ["embed", "--recipe", "micro", "--data", data, "--set", "stages.method=mates", "--set", opts,
            "--limit", "48", "--part-size", "16"]
    killed = mates_process(*args, env={"MATES_FAILPOINT": "embed"}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = EmbeddingStore(data, SETTINGS)
    assert len(store.parts()) == 1 and np.array_equal(store.stored_ids(np.arange(48)), np.arange(16))
    done = mates(*args)  # the next pass, in this process
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert (stats["computed"], stats["reused"], stats["parts_written"]) == (32, 16, 2)
    assert stats["tokens"] > 32 and stats["flops"] > 0  # the one-time pass's share of the compute ledger
    fresh = EmbeddingStore(data, SETTINGS)
    assert np.abs(fresh.load(np.arange(48)) - _direct(data, np.arange(48), encoder)).max() < 1e-5
    # DuckDB reads the parts as any other table
    import duckdb

    [(n, width)] = duckdb.sql(f"SELECT count(*), min(len(embedding)) FROM "
                              f"read_parquet('{fresh.url}/part-*.parquet')").fetchall()
    assert (n, width) == (48, 384)


def test_store_of_another_pool_is_refused(local_pool, tmp_path, encoder):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    store, _ = _ensure(data, np.arange(4), encoder)
    stamp = json.loads(store.store.read_bytes(STAMP))
    store.store.write_bytes(json.dumps({**stamp, "pool_index_sha1": "0" * 40}).encode(), STAMP)
    with pytest.raises(MatesError, match="pool_index_sha1.*remove `.*embeddings/all-MiniLM-L6-v2-L1-len32-fp32`"):
        _ensure(data, np.arange(8), encoder)
    store.store.write_bytes(json.dumps({**stamp, "version": 99}).encode(), STAMP)
    with pytest.raises(MatesError, match="version 99"):
        EmbeddingStore(data, SETTINGS).load(np.arange(4))


def test_frozen_head_learns_and_scores_as_one_matrix_product(tmp_path):
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 10.0, size=48)                     # features of very different scales
    emb = (rng.normal(size=(400, 48)) * scale).astype(np.float32)
    labels = emb[:, :3] @ (1.0 / scale[:3]) + rng.normal(0.0, 0.5, size=400)
    head, metrics = fit_frozen_head(emb, labels, epochs=30, lr=1e-2, batch_size=64, seed=0, log=lambda m: None)
    assert metrics["val_spearman"] > 0.8 and (metrics["train_size"], metrics["val_size"]) == (360, 40)
    with torch.no_grad():
        module = head(torch.as_tensor(emb)).numpy()
    w, b = head.folded()
    assert np.abs(head.predict(emb) - (emb.astype(np.float64) @ w + b)).max() < 1e-12
    assert np.abs(head.predict(emb) - module).max() < 1e-4
    head.save(str(tmp_path / "head"))
    loaded = FrozenHead.load(str(tmp_path / "head"))
    assert np.abs(loaded.predict(emb) - head.predict(emb)).max() < 1e-12  # float64 weights saved
    half = emb.astype(np.float16)                    # an fp16 store's rows, upcast chunk by chunk
    assert np.array_equal(head.predict(half, chunk=7), half.astype(np.float64) @ w + b)
    assert (loaded.label_mean, loaded.label_std) == (metrics["label_mean"], metrics["label_std"])
    with pytest.raises(MatesError, match="at least 10"):
        fit_frozen_head(emb[:5], labels[:5], epochs=1, lr=1e-3, batch_size=4, seed=0)


def test_cross_validated_spearman_scores_only_probes_the_head_never_saw():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    signal = emb @ rng.normal(size=16) + 0.3 * rng.normal(size=200)
    noise = rng.normal(size=200)                             # nothing to learn: out-of-fold rho ~ 0
    fit = dict(epochs=20, lr=1e-2, batch_size=64, seed=3)
    assert cross_validated_spearman(emb, signal, **fit)["cv_spearman_pooled"] > 0.9
    cv = cross_validated_spearman(emb, noise, **fit)
    assert abs(cv["cv_spearman_pooled"]) < 0.25 and abs(cv["cv_spearman"]) < 0.25 and cv["folds"] == 5
    with pytest.raises(MatesError, match="folds"):
        cross_validated_spearman(emb[:30], noise[:30], **fit)


def test_touched_ids_are_the_curated_stages_candidates():
    from curation.select.candidates import candidate_pools
    from jobs.embed import ids_to_embed
    from schemas.recipe import load_recipe
    from tests.conftest import MICRO_RECIPE

    recipe = load_recipe(MICRO_RECIPE, {"stages.count": 3, "stages.batches": [30, 20, 20]})
    pools = candidate_pools([5000], count=3, per_stage=400, seed=recipe.seed)
    touched = ids_to_embed(recipe, [2500, 2500], touched=True)   # auto: samples (2 shards)
    assert np.array_equal(touched, np.sort(np.concatenate(pools[1:])))  # stage 0 is random: not embedded
    assert len(np.intersect1d(touched, pools[0])) == 0 and len(touched) == 800
    assert np.array_equal(ids_to_embed(recipe, [5000], limit=7), np.arange(7))
    with pytest.raises(MatesError, match="`--limit` must be >= 1"):
        ids_to_embed(recipe, [5000], limit=0)


@pytest.mark.slow
def test_two_process_launcher_embeds_data_parallel(local_pool, tmp_path, encoder):
    """`composer -n 2 -m jobs.cli embed`: each rank embeds its half of the ids, in its own parts."""
    import shutil

    from tests.conftest import free_port

    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    result = subprocess.run([composer, "-n", "2", "--master_port", str(free_port()), "-m", "jobs.cli", "embed",
                             "--recipe", "micro", "--data", data, "--set", "stages.method=mates", "--set",
                             "stages.options={encoder_layers: 1, encoder_max_len: 32}", "--limit", "40",
                             "--part-size", "16"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ.copy())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    store = EmbeddingStore(data, SETTINGS)
    # rank 0 owns ids 0..19, rank 1 ids 20..39: two parts each (16 + 4), none spanning both halves
    firsts = sorted(int(p.split("-")[1]) for p in store.parts())
    assert firsts == [0, 16, 20, 36]
    assert np.abs(store.load(np.arange(40)) - _direct(data, np.arange(40), encoder)).max() < 1e-5


def _three_parts(tmp_path, dtype: str = "float32", dim: int = 8):
    """A store of parts holding ids 0..19, 20..39 and 40..59 (random embeddings, no encoder)."""
    data = tmp_path / "data"
    (data / "pool").mkdir(parents=True)
    (data / "pool" / "index.json").write_text("{}")   # the stamp names the pool by this file's sha1
    store = EmbeddingStore(str(data), EmbeddingSettings(layers_kept=1, max_len=32, dtype=dtype))
    store.store.write_bytes(json.dumps(store._expected(dim)).encode(), STAMP)
    emb = np.random.default_rng(0).standard_normal((60, dim)).astype(np.float32)       # [60, D]
    names = [store._write_part(np.arange(lo, lo + 20), emb[lo:lo + 20]) for lo in (0, 20, 40)]
    return store, emb, names


def _record_reads(monkeypatch) -> list:
    reads, real = [], EmbeddingStore._read_part
    monkeypatch.setattr(EmbeddingStore, "_read_part",
                        lambda self, name, columns=None: reads.append((name, columns)) or real(self, name, columns))
    return reads


def test_load_reads_only_the_parts_whose_id_range_holds_the_ids(tmp_path, monkeypatch):
    store, emb, names = _three_parts(tmp_path)
    assert names[1].startswith("part-000000020-000000039-")
    reads = _record_reads(monkeypatch)
    ids = np.array([25, 21, 25, 39])                            # one part's, in any order, one twice
    got = EmbeddingStore(store.data_url, store.settings).load(ids)
    assert [name for name, _ in reads] == [names[1]]
    assert got.dtype == np.float32 and np.array_equal(got, emb[ids])
    reads.clear()
    from schemas.storage import reset_reads

    reset_reads()
    again = EmbeddingStore(store.data_url, store.settings)
    held = again.stored_ids(np.array([5, 45, 99]))
    # the id column of the two overlapping parts (pyarrow's ranged reads; not `_read_part`'s whole
    # GET), no third part, and kept: asking again reads nothing
    counted = reset_reads()
    assert held.tolist() == [5, 45] and reads == []
    assert sorted(os.path.basename(p) for p in counted if "part-" in p) == sorted([names[0], names[2]])
    assert again.stored_ids(np.array([5, 45])).tolist() == [5, 45]
    assert not [p for p in reset_reads() if "part-" in p]                     # the ids were kept
    # a part named by its first id only (before the ranges) is read by its footer's statistics
    old = f"part-000000020-{names[1].split('-')[-1]}"
    os.rename(os.path.join(store.url, names[1]), os.path.join(store.url, old))
    reads.clear()
    assert np.array_equal(EmbeddingStore(store.data_url, store.settings).load(ids), emb[ids])
    assert [name for name, _ in reads] == [old]


def test_fp16_store_loads_fp16_rows_equal_to_what_was_stored(tmp_path):
    store, emb, _ = _three_parts(tmp_path, dtype="float16")
    ids = np.array([59, 0, 33])
    got = EmbeddingStore(store.data_url, store.settings).load(ids)
    assert got.dtype == np.float16 and np.array_equal(got, emb[ids].astype(np.float16))
    with pytest.raises(MatesError, match="lacks the embeddings of 1 samples .*sample_id 60"):
        store.load(np.array([59, 60]))


def test_unit_rows_normalise_fp16_rows_in_place_and_stay_fp16():
    from curation.methods.group_mates_method import unit_rows

    emb = np.random.default_rng(2).normal(size=(50, 16)).astype(np.float16)
    want = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True)
    got = unit_rows(emb, chunk=7)
    assert got is emb and got.dtype == np.float16 and np.abs(got - want).max() < 1e-3
