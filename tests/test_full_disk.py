"""Full disks, failed writes and shared stores.

A write that fails (ENOSPC / EIO injected with `MATES_WRITE_FAULT`, curation/failpoints.py) at a
write site of ingest, a stage boundary or the embedding store is one line, exit 2, leaves no
committed marker and no temporary file, and the rerun after the fault is cleared writes the
bytes of an uninterrupted run. Two `mates embed` processes over one pool share its embedding
store without losing or corrupting a row; a part damaged or deleted under a run stops it with
one line, and the rerun recovers.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import MICRO_RECIPE, ROOT, mates

pytestmark = pytest.mark.slow


def assert_one_line(result, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("mates: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def digest(root: str, skip=("_SUCCESS",)) -> dict:
    """sha1 of every file under `root` but the markers (their summaries hold wall-clock times)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name not in skip:
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


def no_temporaries(root: str) -> None:
    leftovers = [os.path.join(f, n) for f, _, files in os.walk(root) for n in files if n.startswith(".tmp-")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------- ingest
@pytest.fixture(scope="module")
def small_input(micro_corpus, local_pool, tmp_path_factory):
    """Two input files (two pool parts), a target set, and the pool's tokenizer (no BPE training)."""
    folder = tmp_path_factory.mktemp("input")
    lines = open(os.path.join(micro_corpus, "corpus.jsonl")).read().splitlines()[:160]
    for i, part in enumerate((lines[:80], lines[80:])):
        (folder / f"docs-{i}.jsonl").write_text("\n".join(part) + "\n")
    target = os.path.join(micro_corpus, "targets", sorted(os.listdir(os.path.join(micro_corpus, "targets")))[0])
    args = ["--input", str(folder), "--target", f"aim={target}", "--seq-len", "64",
            "--tokenizer", os.path.join(local_pool, "tokenizer", "tokenizer.json")]
    clean = str(tmp_path_factory.mktemp("clean") / "data")
    result = mates("ingest", *args, "--data", clean)
    assert result.returncode == 0, result.stderr[-2000:]
    return args, clean


@pytest.mark.parametrize("fault, needle", [
    ("ENOSPC:scratch", "local scratch"),
    ("ENOSPC:shard.00000.mds", "shard.00000.mds"),
    ("EIO:tokenizer.json", "tokenizer.json"),
    ("ENOSPC:targets/aim.parquet", "aim.parquet"),
    ("ENOSPC:catalog/part-00000.parquet", "part-00000.parquet"),
    ("EIO:pool/index.json", "index.json"),
    ("ENOSPC:_SUCCESS", "_SUCCESS"),
])
def test_ingest_write_fault_commits_nothing_and_rerun_matches(small_input, tmp_path, fault, needle):
    args, clean = small_input
    data = str(tmp_path / "data")
    result = mates("ingest", *args, "--data", data, env={"MATES_WRITE_FAULT": fault})
    errno_text = "No space left on device" if fault.startswith("ENOSPC") else "Input/output error"
    assert_one_line(result, needle, errno_text)
    assert not os.path.exists(os.path.join(data, "_SUCCESS"))
    no_temporaries(data) if os.path.exists(data) else None
    rerun = mates("ingest", *args, "--data", data)                  # the disk has room again
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digest(data) == digest(clean)
    marker, want = (json.load(open(os.path.join(d, "_SUCCESS"))) for d in (data, clean))
    for m in (marker, want):
        m.pop("summary")
    assert marker == want


# ---------------------------------------------------------------- a stage boundary
SHORT = ("--set", "stages.batches=[6, 4]")


@pytest.fixture(scope="module")
def clean_short_run(local_pool, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("clean-run") / "run")
    result = mates("run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}", *SHORT)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.mark.parametrize("fault, needle", [
    ("ENOSPC:stages/1/selection.parquet", "selection.parquet"),
    ("EIO:stages/1/_SUCCESS", "_SUCCESS"),
    ("ENOSPC:stages/1/index/streams.json", "streams.json"),
    ("ENOSPC:checkpoints/stage-0-state.pt", "stage-0-state.pt"),
    ("EIO:metrics.parquet", "metrics.parquet"),
    ("ENOSPC:scratch", "index scratch"),
])
def test_boundary_write_fault_commits_nothing_and_rerun_matches(local_pool, clean_short_run, tmp_path, fault, needle):
    run = str(tmp_path / "run")
    args = ("run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}", *SHORT)
    assert_one_line(mates(*args, env={"MATES_WRITE_FAULT": fault}), needle)
    assert not os.path.exists(os.path.join(run, "stages", "1", "_SUCCESS"))
    no_temporaries(run)
    rerun = mates(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    stage = os.path.join(run, "stages", "1")
    for folder, _, files in os.walk(stage):                        # the stage, byte for byte
        for name in files:
            if name == "_SUCCESS":                                    # holds the phases' wall-clock times
                continue
            path = os.path.join(folder, name)
            got = open(path, "rb").read().replace(run.encode(), b"<run>")
            clean = open(path.replace(run, clean_short_run), "rb").read().replace(clean_short_run.encode(), b"<run>")
            assert got == clean, path
    assert os.path.exists(os.path.join(stage, "selection.parquet"))
    import pyarrow.parquet as pq

    got, want = (pq.read_table(os.path.join(r, "metrics.parquet")).to_pylist() for r in (run, clean_short_run))
    assert [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in got] == \
        [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in want]


# ---------------------------------------------------------------- the embedding store
EMBED = ("--recipe", MICRO_RECIPE, "--set", "stages.method=mates",
         "--set", "stages.options={encoder_layers: 1, encoder_max_len: 32, batch_size: 4}",
         "--limit", "48", "--part-size", "16")


def embed(data: str, env=None):
    return mates("embed", *EMBED, "--data", data, env=env)


def store_dir(data: str) -> str:
    root = os.path.join(data, "embeddings")
    (key,) = os.listdir(root)
    return os.path.join(root, key)


@pytest.fixture
def pool_copy(local_pool, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    return data


@pytest.fixture(scope="module")
def clean_store(local_pool, tmp_path_factory):
    data = str(tmp_path_factory.mktemp("embedded") / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    result = embed(data)
    assert result.returncode == 0, result.stderr[-2000:]
    return store_dir(data)


@pytest.mark.parametrize("fault, needle", [
    ("ENOSPC:.parquet", "part-"),
    ("EIO:embeddings.json", "embeddings.json"),
])
def test_embedding_write_fault_and_rerun(pool_copy, clean_store, fault, needle):
    assert_one_line(embed(pool_copy, env={"MATES_WRITE_FAULT": fault}), needle)
    no_temporaries(pool_copy)
    parts = [p for p in os.listdir(store_dir(pool_copy)) if p.startswith("part-")] \
        if os.path.exists(os.path.join(pool_copy, "embeddings")) else []
    assert parts == []                                               # the failed part is not there
    rerun = embed(pool_copy)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digest(store_dir(pool_copy)) == digest(clean_store)


def test_damaged_part_stops_the_run_and_the_rerun_recovers(pool_copy, clean_store):
    assert embed(pool_copy).returncode == 0
    part = os.path.join(store_dir(pool_copy), sorted(p for p in os.listdir(store_dir(pool_copy))
                                                     if p.startswith("part-"))[1])
    with open(part, "r+b") as handle:                               # truncated under the store
        handle.truncate(os.path.getsize(part) // 3)
    assert_one_line(embed(pool_copy), os.path.basename(part), "damaged", "rerun")
    rerun = embed(pool_copy)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digest(store_dir(pool_copy)) == digest(clean_store)      # the part recomputed, same bytes


def test_damaged_stamp_is_one_line(pool_copy):
    assert embed(pool_copy).returncode == 0
    stamp = os.path.join(store_dir(pool_copy), "embeddings.json")
    with open(stamp, "r+b") as handle:
        handle.truncate(10)
    assert_one_line(embed(pool_copy), "embeddings.json", "not JSON")


def test_two_processes_share_one_store(pool_copy, clean_store):
    """Two `mates embed` processes at once over the same ids of one pool: both succeed, and the
    store holds every id once or more, each copy equal to the uninterrupted pass's row."""
    cmd = [sys.executable, "-m", "jobs.cli", "embed", *EMBED, "--data", pool_copy]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    from curation.influence.embeddings import EmbeddingSettings, EmbeddingStore

    settings = EmbeddingSettings(layers_kept=1, max_len=32)
    ids = np.arange(48)
    got = EmbeddingStore(pool_copy, settings).load(ids)
    want = EmbeddingStore(os.path.dirname(os.path.dirname(clean_store)), settings).load(ids)
    assert np.array_equal(got, want)
    import pyarrow.parquet as pq

    rows = [pq.read_table(os.path.join(store_dir(pool_copy), p)) for p in os.listdir(store_dir(pool_copy))
            if p.startswith("part-")]
    stored = np.concatenate([np.asarray(t.column("sample_id")) for t in rows])
    assert set(stored.tolist()) == set(ids.tolist())                 # nothing lost
    no_temporaries(pool_copy)


# ---------------------------------------------------------------- a run's own state
def test_state_file_truncated_under_a_run_then_recovered(local_pool, clean_short_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(clean_short_run, run)
    checkpoints = os.path.join(run, "checkpoints")
    for name in ("stage-1-state.pt", "stage-1.pt"):                 # stage 1's training undone
        os.remove(os.path.join(checkpoints, name))
    state = os.path.join(checkpoints, "stage-0-state.pt")
    with open(state, "r+b") as handle:                              # and the state it starts from cut short
        handle.truncate(os.path.getsize(state) // 2)
    args = ("run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}", *SHORT)
    assert_one_line(mates(*args), "stage-0-state.pt", "remove it and rerun")
    os.remove(state)                                                # what the line says to do
    rerun = mates(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    import pyarrow.parquet as pq

    got, want = (pq.read_table(os.path.join(r, "metrics.parquet")).to_pylist() for r in (run, clean_short_run))
    assert [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in got] == \
        [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in want]


def test_two_frozen_runs_at_once_share_the_store(local_pool, tmp_path):
    """Two `mates run` processes at once over one pool, `backbone: frozen`: both embed the stage's
    candidates into the same store. Both finish, select the same samples (same recipe and seed),
    and every candidate's stored embedding is readable and equal to a fresh single pass."""
    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    options = ("stages.options={backbone: frozen, n_probes: 16, probe_batch: 16, encoder_layers: 1, "
               "encoder_max_len: 32, max_target: 8, head_epochs: 5}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "jobs.cli", "run", MICRO_RECIPE, "--set", f"data={data}",
               "--set", f"run={tmp_path / name}", "--set", "stages.batches=[6, 4]", "--set", "stages.pool_per_stage=160",
               "--set", "stages.method=mates", "--set", options]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    import pyarrow.parquet as pq

    a, b = (pq.read_table(os.path.join(tmp_path, r, "stages", "1", "selection.parquet")) for r in ("a", "b"))
    assert a.equals(b)
    from curation.influence.embeddings import EmbeddingSettings, EmbeddingStore

    settings = EmbeddingSettings(layers_kept=1, max_len=32)
    ids = np.asarray(a.column("sample_id"))                          # the stage's candidates
    stored = EmbeddingStore(data, settings).load(ids)               # every one there, readable
    fresh = str(tmp_path / "fresh")
    shutil.copytree(local_pool, fresh, ignore=shutil.ignore_patterns("embeddings"))
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.store.pool import MDSFolder
    from schemas.storage import join

    store = EmbeddingStore(fresh, settings, part_size=2048)
    store.ensure(ids, pool=MDSFolder(join(fresh, "pool")), pool_tokenizer=load_pool_tokenizer(fresh), progress=False)
    assert np.abs(stored - store.load(ids)).max() < 1e-5             # same values (batching aside)
    no_temporaries(data)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_stage_index_shard_damaged_under_a_run_then_recovered(local_pool, clean_short_run, tmp_path, damage):
    run = str(tmp_path / "run")
    shutil.copytree(clean_short_run, run)
    for name in ("stage-1-state.pt", "stage-1.pt"):                 # stage 1 still to train...
        os.remove(os.path.join(run, "checkpoints", name))
    index = os.path.join(run, "stages", "1", "index")
    bucket = sorted(b for b in os.listdir(index) if os.path.isdir(os.path.join(index, b)))[0]
    shard = os.path.join(index, bucket, "shard.00000.mds")
    if damage == "truncated":                                       # ...from an index damaged under it
        with open(shard, "r+b") as handle:
            handle.truncate(os.path.getsize(shard) // 2)
    else:
        os.remove(shard)
    args = ("run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}", *SHORT)
    assert_one_line(mates(*args), f"{bucket}/shard.00000.mds", "truncated" if damage == "truncated" else "missing",
                    "rerun")
    assert not os.path.exists(os.path.join(run, "stages", "1", "_SUCCESS"))  # decommitted, so...
    rerun = mates(*args)                                            # ...the rerun redoes the stage
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    import pyarrow.parquet as pq

    got, want = (pq.read_table(os.path.join(r, "metrics.parquet")).to_pylist() for r in (run, clean_short_run))
    assert [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in got] == \
        [(m["stage"], m["eval_set"], round(m["loss"], 5)) for m in want]
    assert open(shard, "rb").read() == open(shard.replace(run, clean_short_run), "rb").read()
