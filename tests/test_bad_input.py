"""The bad-input catalog: each case is a one-line error naming the file or key, exit status 2,
and nothing already committed changes. Cases run the CLI's `main` in-process (same code path as
the `mates` command, without paying the start-up imports for every case)."""
import hashlib
import json
import os
import shutil

import pytest

from jobs.cli import main
from tests.conftest import MICRO_RECIPE

pytestmark = pytest.mark.slow


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("mates: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def tree_digest(root: str) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


# The corrupted-run cases fail before any training: short stages make the run they corrupt cheap.
SHORT = "stages.batches=[6, 4]"


@pytest.fixture(scope="module")
def finished_run(local_pool, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    assert main(["run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}", "--set", SHORT]) == 0
    return run


@pytest.fixture
def pool_copy(local_pool, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data)
    return data


def run_micro(capsys, data, run, *sets):
    args = ["run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}"]
    for s in sets:
        args += ["--set", s]
    return run_cli(capsys, *args)


# ---------------------------------------------------------------- corrupted pools
def _shard(data):
    return os.path.join(data, "pool", "part-00000", "shard.00000.mds")


def test_truncated_shard(capsys, pool_copy, tmp_path):
    size = os.path.getsize(_shard(pool_copy))
    with open(_shard(pool_copy), "r+b") as handle:
        handle.truncate(size // 2)
    code, err = run_micro(capsys, pool_copy, str(tmp_path / "run"))
    assert_one_line_error(code, err, "shard.00000.mds", "truncated")
    assert not os.path.exists(tmp_path / "run" / "stages" / "0" / "_SUCCESS")


def test_flipped_bytes_fail_the_hash_check(capsys, pool_copy, tmp_path):
    with open(_shard(pool_copy), "r+b") as handle:
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, err = run_micro(capsys, pool_copy, str(tmp_path / "run"))
    assert_one_line_error(code, err, "shard.00000.mds", "sha1")


def test_missing_index_json(capsys, pool_copy, tmp_path):
    os.remove(os.path.join(pool_copy, "pool", "index.json"))
    code, err = run_micro(capsys, pool_copy, str(tmp_path / "run"))
    assert_one_line_error(code, err, "index.json")


@pytest.mark.parametrize("basename", ["/etc/passwd", "../../outside.mds", "sub/../../x.mds"])
def test_index_basename_escaping_its_folder(capsys, pool_copy, tmp_path, basename):
    path = os.path.join(pool_copy, "pool", "index.json")
    index = json.load(open(path))
    index["shards"][0]["raw_data"]["basename"] = basename
    json.dump(index, open(path, "w"))
    code, err = run_micro(capsys, pool_copy, str(tmp_path / "run"))
    assert_one_line_error(code, err, "index.json", "plain relative name")


def test_pool_smaller_than_stage_budget(capsys, local_pool, tmp_path):
    code, err = run_micro(capsys, local_pool, str(tmp_path / "run"), "stages.pool_per_stage=1000000")
    assert_one_line_error(code, err, "`stages.pool_per_stage`")
    assert not os.path.exists(tmp_path / "run" / "stages")


def test_pool_sequences_longer_than_model_context(capsys, local_pool, tmp_path):
    code, err = run_micro(capsys, local_pool, str(tmp_path / "run"), "variables.seq_len=32")
    assert_one_line_error(code, err, "`model.max_seq_len`", "64")


def test_data_folder_that_is_not_a_pool(capsys, tmp_path):
    code, err = run_micro(capsys, str(tmp_path / "empty"), str(tmp_path / "run"))
    assert_one_line_error(code, err, "no ingested pool")


# ---------------------------------------------------------------- corrupted runs
@pytest.fixture
def run_copy(finished_run, tmp_path):
    """The finished micro run with stage 1's training undone, so `mates run` must redo it."""
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    for name in ("stage-1-state.pt", "stage-1.pt"):
        os.remove(os.path.join(run, "checkpoints", name))
    return run


@pytest.mark.parametrize("proportion", [-0.5, float("nan"), 0, "x"])
def test_streams_file_with_bad_proportion(capsys, local_pool, run_copy, proportion):
    path = os.path.join(run_copy, "stages", "1", "index", "streams.json")
    manifest = json.load(open(path))
    manifest["streams"][0]["proportion"] = proportion
    with open(path, "w") as handle:
        handle.write(json.dumps(manifest))  # json writes NaN as the bare token NaN
    before = tree_digest(run_copy)
    code, err = run_micro(capsys, local_pool, run_copy, SHORT)
    assert_one_line_error(code, err, "streams.json", "proportion")
    assert tree_digest(run_copy) == before


def test_streams_path_escaping_the_index(capsys, local_pool, run_copy):
    path = os.path.join(run_copy, "stages", "1", "index", "streams.json")
    manifest = json.load(open(path))
    manifest["streams"][0]["path"] = "../../../../etc"
    json.dump(manifest, open(path, "w"))
    code, err = run_micro(capsys, local_pool, run_copy, SHORT)
    assert_one_line_error(code, err, "streams.json", "plain relative name")


def test_streams_file_not_json(capsys, local_pool, run_copy):
    with open(os.path.join(run_copy, "stages", "1", "index", "streams.json"), "w") as handle:
        handle.write("{not json")
    code, err = run_micro(capsys, local_pool, run_copy, SHORT)
    assert_one_line_error(code, err, "streams.json", "not valid JSON")


def test_checkpoint_that_is_not_a_checkpoint(capsys, local_pool, run_copy):
    with open(os.path.join(run_copy, "checkpoints", "stage-0-state.pt"), "wb") as handle:
        handle.write(b"this is not a checkpoint")
    before = tree_digest(run_copy)
    code, err = run_micro(capsys, local_pool, run_copy, SHORT)
    assert_one_line_error(code, err, "stage-0-state.pt", "not a probe state")
    assert tree_digest(run_copy) == before


def test_curate_needs_the_previous_state(capsys, local_pool, finished_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    os.remove(os.path.join(run, "checkpoints", "stage-0-state.pt"))
    code, err = run_cli(capsys, "curate", "--run", run, "--stage", "1", "--force")
    assert_one_line_error(code, err, "stage 0")


# ---------------------------------------------------------------- recipes and ingest input
@pytest.mark.parametrize("settings, needle", [
    (["stages.method=magic"], "`stages.method`"),
    (["stages.selection_ratio=1.5"], "`stages.selection_ratio`"),
    (["stages.selection_ratio=0"], "`stages.selection_ratio`"),
    (["train_loader.batch_size=many"], "`train_loader.batch_size`"),
    (["model.dropout=[1]"], "`model.dropout`"),
    (["stages.method=mates", "stages.options={n_probes: 0}"], "`stages.options.n_probes`"),
])
def test_recipe_errors_before_any_work(capsys, local_pool, tmp_path, settings, needle):
    code, err = run_micro(capsys, local_pool, str(tmp_path / "run"), *settings)
    assert_one_line_error(code, err, needle)
    assert not os.path.exists(tmp_path / "run")  # validated before anything was written


def test_huge_document_is_refused(capsys, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as handle:
        handle.write(json.dumps({"id": "small", "text": "a small document " * 20}) + "\n")
        handle.write(json.dumps({"id": "dump", "text": "x" * 12_000_000}) + "\n")  # under the line bound
    code, err = run_cli(capsys, "ingest", "--input", str(big), "--data", str(tmp_path / "data"))
    assert_one_line_error(code, err, "`dump`", "ingest.max_doc_chars")
    assert not os.path.exists(tmp_path / "data" / "pool")


def test_empty_pool_after_slicing(capsys, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("\n".join(json.dumps({"text": "hi"}) for _ in range(50)) + "\n")
    code, err = run_cli(capsys, "ingest", "--input", str(tiny), "--data", str(tmp_path / "data"),
                        "--vocab-size", "300")
    assert_one_line_error(code, err, "ingest.min_tokens")
    assert not os.path.exists(tmp_path / "data" / "_SUCCESS")


def test_tokenizer_file_that_is_not_a_tokenizer(capsys, micro_corpus, tmp_path):
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text('{"hello": 1}')
    code, err = run_cli(capsys, "ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"),
                        "--data", str(tmp_path / "data"), "--tokenizer", str(bogus))
    assert_one_line_error(code, err, "`tokenizer.path`")
