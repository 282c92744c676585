"""A newcomer's first commands: every path or URL the CLI takes given as a bare relative name.

Runs in a fresh current folder, with the CLI's `main` in-process (the `mates` command's code path
without the start-up imports per command), as `tests/test_bad_input.py` does.
"""
import json
import os
import shutil

from curation.data.tokenizer import train_bpe
from curation.store.catalog import read_catalog
from jobs.cli import main
from tests.conftest import MICRO_RECIPE


def test_every_command_takes_bare_relative_names(micro_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo-corpus", "corpus", "--max-per-source", "30"]) == 0
    assert os.path.exists("corpus/corpus.jsonl")
    # the user's own files sit in the current folder: corpus.jsonl, a recipe, a tokenizer.json
    shutil.copy(os.path.join(micro_corpus, "corpus.jsonl"), "corpus.jsonl")
    shutil.copy(MICRO_RECIPE, "micro.yaml")
    texts = [json.loads(line)["text"] for line in open("corpus.jsonl")]
    with open("tokenizer.json", "w") as handle:
        handle.write(train_bpe(texts, 512).to_str())

    shutil.copy(os.path.join(micro_corpus, "targets", "wiki_en.jsonl"), "target.jsonl")
    shutil.copytree(os.path.join(micro_corpus, "eval"), "eval")
    assert main(["ingest", "--input", "corpus.jsonl", "--data", "data", "--recipe", "micro.yaml",
                 "--target", "wiki_en=target.jsonl", "--eval", "wiki_en=eval/wiki_en.jsonl",
                 "--tokenizer", "tokenizer.json"]) == 0, capsys.readouterr().err
    catalog = read_catalog("data", None)
    assert catalog.num_rows == json.load(open("data/_SUCCESS"))["summary"]["sequences"] > 0
    assert json.load(open("data/tokenizer/tokenizer.json"))["model"]["vocab"] == \
        json.load(open("tokenizer.json"))["model"]["vocab"]

    assert main(["run", "micro.yaml", "--set", "data=data", "--set", "run=run", "--set", "stages.batches=[4, 2]"]) == 0
    assert os.path.exists("run/stages/1/_SUCCESS") and os.path.exists("run/checkpoints/stage-1-state.pt")
    assert main(["curate", "--run", "run", "--stage", "1"]) == 0
    capsys.readouterr()
    assert main(["query", "run", "SELECT count(*) AS n FROM samples", "--csv", "-"]) == 0
    assert capsys.readouterr().out.split() == ['"n"', str(catalog.num_rows)]
    assert main(["report", "run", "--out", "report"]) == 0
    assert os.path.getsize("report/index.html") > 0 and os.path.getsize("report/loss.png") > 0
    assert main(["compare", "micro.yaml", "--methods", "random", "--seeds", "1", "--out", "cmp",
                 "--set", "data=data", "--set", "stages.batches=[4, 2]"]) == 0, capsys.readouterr().err
    assert os.path.exists("cmp/runs.parquet")
