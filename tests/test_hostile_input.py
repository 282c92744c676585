"""Hostile input, round three: bounded parsing, names, ids, `mates query`'s refusals.

Every refusal here is exit status 2, one `mates: error:` line, no traceback, within seconds, and
nothing committed (no run folder, no pool `_SUCCESS`). The CLI runs in-process (`tests.conftest.mates`,
the same parser and handlers as the `mates` command); the measured worst cases of each bound, in
a fresh process each, are `mates bench bounds`.
"""
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.data.ingest  # noqa: F401  (imported once here: the timed refusals time the refusal,
import composer  # noqa: F401   not the first import of Composer that `mates ingest` pays)
from curation.store.catalog import read_catalog
from schemas import bounds
from tests.conftest import MICRO_RECIPE, mates, mates_process

pytestmark = pytest.mark.slow


def assert_refused(result, *needles: str, seconds: float = 10.0, started: float | None = None) -> str:
    """Exit 2, exactly one error line naming every needle, no traceback (and fast, when timed)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("mates: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    if started is not None:
        assert time.perf_counter() - started < seconds, lines[0]
    return lines[0]


def run_recipe(recipe: str, tmp_path, *sets: str):
    args = ["run", recipe, "--set", f"run={tmp_path / 'run'}", "--set", f"data={tmp_path / 'data'}"]
    for s in sets:
        args += ["--set", s]
    return mates(*args)


def nothing_committed(tmp_path) -> None:
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data" / "_SUCCESS")


def laughs(levels: int = 12) -> str:
    """Billion laughs: each anchor is ten aliases of the one before (10^levels scalars expanded)."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- 1. bounded parsing: recipes
@pytest.mark.parametrize("body, needle", [
    (laughs() + "variables: {x: *l11}\n", "YAML nodes"),                       # billion laughs
    ("variables: {x: " + "[" * 10_000 + "]" * 10_000 + "}\n", "nests deeper than 64"),
    ("variables: {x: &a [1, *a]}\n", "recursive alias"),
    ("variables: {x: [" + ", ".join(["1"] * 30_000) + "]}\n", "more than 20,000 YAML nodes"),
])
def test_hostile_recipe_is_refused_while_parsed(tmp_path, body, needle):
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(open(MICRO_RECIPE).read() + body)
    started = time.perf_counter()
    assert_refused(run_recipe(str(recipe), tmp_path), str(recipe), needle, started=started)
    nothing_committed(tmp_path)


@pytest.mark.parametrize("kind", ["recipe", "record"])
def test_hostile_input_in_a_fresh_process(tmp_path, kind):
    """The same refusals as the `mates` command itself gives them: its own exit status, its own
    stderr, and (ingest no longer imports Composer for one process) within a few seconds."""
    if kind == "recipe":
        recipe = tmp_path / "laughs.yaml"
        recipe.write_text(open(MICRO_RECIPE).read() + laughs(30) + "variables: {x: *l29}\n")
        args, needle = ["run", str(recipe), "--set", f"run={tmp_path / 'run'}"], "YAML nodes"
    else:
        corpus = tmp_path / "deep.jsonl"
        corpus.write_bytes(b'{"text": "x", "m": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}\n")
        args, needle = ["ingest", "--input", str(corpus), "--data", str(tmp_path / "data")], "1,000,001 levels"
    started = time.perf_counter()
    assert_refused(mates_process(*args, timeout=120), needle, seconds=30, started=started)
    nothing_committed(tmp_path)
    assert not os.path.exists(tmp_path / "data")


def test_oversized_recipe_is_refused_before_reading(tmp_path):
    recipe = tmp_path / "huge.yaml"
    with open(recipe, "wb") as handle:  # sparse: 2 GB of nothing costs nothing to make
        handle.truncate(2 << 30)
    started = time.perf_counter()
    assert_refused(run_recipe(str(recipe), tmp_path), "huge.yaml", "2,147,483,648 bytes", "1,048,576",
                   seconds=2, started=started)
    nothing_committed(tmp_path)


def test_set_value_is_bounded_yaml_too(tmp_path):
    started = time.perf_counter()
    value = "{" + laughs().replace("\n", ", ").rstrip(", ") + ", x: *l11}"
    result = run_recipe(MICRO_RECIPE, tmp_path, f"variables.x={value}")
    assert_refused(result, "`--set variables.x`", "YAML nodes", started=started)
    nothing_committed(tmp_path)


# ---------------------------------------------------------------- 1. bounded parsing: corpus and sets
def ingest(tmp_path, input_path, *extra: str):
    return mates("ingest", "--input", str(input_path), "--data", str(tmp_path / "data"), *extra)


def test_line_without_end_is_refused_at_the_bound(tmp_path):
    corpus = tmp_path / "one-line.jsonl"
    with open(corpus, "wb") as handle:  # one record that never ends: the bound, not memory, stops it
        handle.write(b'{"text": "' + b"x" * (bounds.MAX_LINE_BYTES + 4096))
    started = time.perf_counter()
    assert_refused(ingest(tmp_path, corpus), "one-line.jsonl:1", f"{bounds.MAX_LINE_BYTES:,} bytes", started=started)
    assert not os.path.exists(tmp_path / "data")


def test_deeply_nested_record_is_refused(tmp_path):
    corpus = tmp_path / "deep.jsonl"
    corpus.write_text(json.dumps({"text": "fine " * 20}) + "\n"
                      + '{"text": "x", "meta": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    started = time.perf_counter()
    assert_refused(ingest(tmp_path, corpus), "deep.jsonl:2", "200,001 levels", "bound is 64", started=started)
    assert not os.path.exists(tmp_path / "data")


def test_parquet_footer_past_the_bound(tmp_path):
    bogus = tmp_path / "bogus.parquet"
    bogus.write_bytes(b"PAR1" + b"\0" * 64 + (bounds.MAX_PARQUET_FOOTER_BYTES + 1).to_bytes(4, "little") + b"PAR1")
    assert_refused(ingest(tmp_path, bogus), "bogus.parquet", "footer of 8,388,609 bytes")
    assert not os.path.exists(tmp_path / "data")


def test_parquet_row_group_past_the_bound(tmp_path, monkeypatch):
    path = tmp_path / "one-group.parquet"
    texts = [f"document {i}: " + " ".join(str(i * j) for j in range(80)) for i in range(400)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    monkeypatch.setattr(bounds, "MAX_COLUMN_CHUNK_BYTES", 100_000)  # 200 kB of text in one group
    assert_refused(ingest(tmp_path, path), "one-group.parquet", "row group 0", "bound is 100,000")
    assert not os.path.exists(tmp_path / "data")


def test_set_file_over_the_bound(micro_corpus, tmp_path):
    big = tmp_path / "target.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(bounds.MAX_SET_BYTES + 1)
    result = ingest(tmp_path, os.path.join(micro_corpus, "corpus.jsonl"), "--target", f"big={big}")
    assert_refused(result, "--target big", "67,108,865 bytes", "bound for a set file")
    assert not os.path.exists(tmp_path / "data")


def test_set_record_nested_too_deep(micro_corpus, tmp_path):
    deep = tmp_path / "eval.jsonl"
    deep.write_text('{"text": "x", "m": ' + "{\"a\": " * 5000 + "1" + "}" * 5000 + "}\n")
    result = ingest(tmp_path, os.path.join(micro_corpus, "corpus.jsonl"), "--eval", f"deep={deep}")
    assert_refused(result, "eval.jsonl:1", "5,001 levels")
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("record, needle", [
    ('{"text": "half a pair \\ud800 here"}', "unpaired surrogate"),
    ('{"text": "fine", "id": "' + "i" * 5000 + '"}', "`id` of 5,000 characters"),
    ('{"text": "fine", "source": "' + "s" * 300 + '"}', "`source` of 300 characters"),
])
def test_records_no_writer_could_store_are_refused(tmp_path, record, needle):
    corpus = tmp_path / "odd.jsonl"
    corpus.write_text(json.dumps({"text": "a normal document " * 20}) + "\n" + record + "\n")
    assert_refused(ingest(tmp_path, corpus, "--vocab-size", "300"), "odd.jsonl:2", needle)
    assert not os.path.exists(tmp_path / "data")                    # no folder left behind either


def test_set_row_with_unpaired_surrogate(micro_corpus, tmp_path):
    bad = tmp_path / "aim.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "not \\udc00 text"}\n')
    result = ingest(tmp_path, os.path.join(micro_corpus, "corpus.jsonl"), "--target", f"aim={bad}")
    assert_refused(result, "aim.jsonl:2", "unpaired surrogate")
    assert not os.path.exists(tmp_path / "data")


def test_pool_shard_deleted_under_a_run(local_pool, tmp_path):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data, ignore=shutil.ignore_patterns("embeddings"))
    os.remove(os.path.join(data, "pool", "part-00000", "shard.00000.mds"))
    result = mates("run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={tmp_path / 'run'}")
    assert_refused(result, "part-00000/shard.00000.mds", "is missing", "re-ingest")
    assert not os.path.exists(tmp_path / "run" / "stages" / "0" / "_SUCCESS")


# ---------------------------------------------------------------- 2. names and URLs
@pytest.mark.parametrize("name, needle", [
    ("t" * 200, "200 characters"),
    ("../escape", "must be letters"),
    ("two words", "must be letters"),
    ("new\nline", "must be letters"),
])
def test_bad_set_names_write_nothing(micro_corpus, tmp_path, name, needle):
    target = os.path.join(micro_corpus, "targets", os.listdir(os.path.join(micro_corpus, "targets"))[0])
    result = ingest(tmp_path, os.path.join(micro_corpus, "corpus.jsonl"), "--target", f"{name}={target}")
    assert_refused(result, "--target name", needle)
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("setting, needle", [
    ('run="/tmp/mates-\\a-bell"', "control character '\\x07'"),   # YAML's escape for BEL
    ("run=/tmp/mates-\x00-nul", "not valid YAML"),
    ("data=" + "/tmp/" + "d" * 2000, "2,005 characters"),
    ("run=s3://Not_A_Bucket/run", "not an S3 bucket name"),
    ("stages/method=mates", "must be letters"),
    ("k" * 300 + "=1", "300 characters"),
    ("model.d_model.x=1", "`model.d_model` is int"),
])
def test_bad_urls_and_set_keys_write_nothing(tmp_path, setting, needle):
    args = ["run", MICRO_RECIPE, "--set", f"run={tmp_path / 'run'}", "--set", f"data={tmp_path / 'data'}",
            "--set", setting]
    assert_refused(mates(*args), needle)
    nothing_committed(tmp_path)


def test_recipe_key_that_is_not_a_name(tmp_path):
    recipe = tmp_path / "keys.yaml"
    recipe.write_text(open(MICRO_RECIPE).read() + "variables: {1: one, two: 2}\n")
    assert_refused(run_recipe(str(recipe), tmp_path), "recipe key variables.1", "string name")
    nothing_committed(tmp_path)


# ---------------------------------------------------------------- 3. ids unique across folders
def test_same_named_files_in_two_folders_get_distinct_ids(local_pool, tmp_path):
    corpus = tmp_path / "corpus"
    for folder in ("a", "b"):
        os.makedirs(corpus / folder)
        with open(corpus / folder / "docs.jsonl", "w") as handle:  # no `id`: ids are <file>:<line>
            for i in range(30):
                handle.write(json.dumps({"text": f"document {i} of folder {folder}: " + "words here " * 30}) + "\n")
    tokenizer = os.path.join(local_pool, "tokenizer", "tokenizer.json")
    result = mates("ingest", "--input", str(corpus), "--data", str(tmp_path / "data"), "--tokenizer", tokenizer,
                   "--seq-len", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    catalog = read_catalog(str(tmp_path / "data"), None)
    docs = set(zip(catalog.column("doc_id").to_pylist(), catalog.column("chunk").to_pylist()))
    assert len(docs) == catalog.num_rows                      # no (doc, chunk) twice
    doc_ids = set(catalog.column("doc_id").to_pylist())
    assert len(doc_ids) == 60 and {d.split(":")[0] for d in doc_ids} == {"a/docs.jsonl", "b/docs.jsonl"}
    ids = sorted(catalog.column("sample_id").to_pylist())    # sample ids across the two merged parts
    assert ids == list(range(catalog.num_rows))


# ---------------------------------------------------------------- 6. mates query refusals
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from schemas.storage import store_for, write_parquet

    run = str(tmp_path_factory.mktemp("q") / "run")
    store_for(run).write_bytes(b"data: /nowhere\nrun: /nowhere\n", "recipe.yaml")
    table = pa.table({"sample_id": [1, 2], "bucket": ["b000", ""], "weight": [1.0, 0.0], "selected": [True, False]})
    write_parquet(table, run, "stages", "0", "selection.parquet")
    store_for(run).write_bytes(b'{"stage": 0, "method": "random"}', "stages", "0", "_SUCCESS")
    return run


@pytest.mark.parametrize("sql, needles", [
    ("SELECT * FROM read_csv('/etc/passwd')", ["reads a file outside the run", "read-only SELECT", "selection"]),
    ("SELECT content FROM read_text('/etc/hostname')", ["reads a file outside the run", "selection, stages"]),
    ("COPY (SELECT 1) TO '/tmp/mates-evil.csv'", ["COPY statement, refused", "never writes", "--csv FILE"]),
    ("ATTACH '/tmp/mates-evil.db'", ["ATTACH statement, refused", "selection"]),
    ("SELECT 1; SELECT 2", ["holds 2 statements", "one read-only SELECT"]),
    ("INSTALL httpfs", ["LOAD statement, refused"]),
    ("SELECT * FROM read_csv('https://example.com/x.csv')", ["remote file or URL outside the run", "(selection, stages)"]),
])
def test_query_refusals_say_what_is_allowed(tiny_run, sql, needles):
    line = assert_refused(mates("query", tiny_run, sql), *needles)
    assert "tried to write or reconfigure" not in line
    assert not os.path.exists("/tmp/mates-evil.csv") and not os.path.exists("/tmp/mates-evil.db")
