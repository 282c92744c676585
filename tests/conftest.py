"""Shared fixtures: a real S3 protocol server on loopback and a small ingested corpus.

The S3 server is moto's `ThreadedMotoServer` bound to 127.0.0.1 on a free port; s3fs, boto3,
mosaicml-streaming and DuckDB all reach it through the standard environment variables. Nothing
here targets any other address.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_RECIPE = os.path.join(ROOT, "training", "recipes", "micro.yaml")
FAKE_SECRET = "mates-test-secret-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start moto on 127.0.0.1 and point every S3 client of this process (and children) at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint, "S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3

    name = f"mates-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory) -> str:
    """A small demo corpus (every source, a few hundred documents): folder with corpus.jsonl."""
    from curation.data.demo_corpus import DemoCorpusConfig, write_demo_corpus

    out = str(tmp_path_factory.mktemp("corpus"))
    write_demo_corpus(out, DemoCorpusConfig(seed=0, max_per_source=120, n_target=64, n_eval=64))
    return out


def ingest_corpus(corpus: str, data: str, recipe, **kw):
    """Ingest a demo corpus folder (corpus.jsonl + its target and eval sets) into `data`."""
    from curation.data.demo_corpus import demo_set_files
    from curation.data.ingest import ingest

    targets, evals = demo_set_files(corpus)
    return ingest(os.path.join(corpus, "corpus.jsonl"), data, cfg=recipe.ingest, tokenizer_cfg=recipe.tokenizer,
                  targets=targets, evals=evals, **kw)


def mates(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `mates` CLI's `main` in this process, as `mates ARGS...` would (same parser, same
    handlers, same exit status), with `env` set for the call only; stdout and stderr captured.

    In-process because a child pays the torch / Composer imports (seconds) on every call. Tests
    about a process (a SIGKILL, the `composer -n 2` launcher) use `mates_process` instead."""
    import contextlib
    import io
    import traceback

    from jobs.cli import main

    if env and "MATES_FAILPOINT" in env:
        raise ValueError("MATES_FAILPOINT kills the process it is in: use `mates_process`.")
    # text streams over bytes: `mates query --csv -` writes to sys.stdout.buffer
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    text = [stream.buffer.getvalue().decode("utf-8", errors="replace") for stream in (out, err)]
    return subprocess.CompletedProcess(["mates", *args], code, *text)


def mates_process(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `mates` CLI in a child process, as a user would."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def s3_pool(micro_corpus, s3_server):
    """The micro corpus ingested once into its own bucket, with the micro recipe's settings."""
    import boto3

    from schemas.recipe import load_recipe

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-pool")
    recipe = load_recipe(MICRO_RECIPE)
    data = "s3://mates-pool/data"
    ingest_corpus(micro_corpus, data, recipe)
    return data


@pytest.fixture(scope="session")
def clean_run(s3_pool, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-run-clean")
    run = "s3://mates-run-clean/run"
    result = mates("run", MICRO_RECIPE, "--set", f"data={s3_pool}", "--set", f"run={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@pytest.fixture(scope="session")
def local_pool(micro_corpus, tmp_path_factory):
    """The micro corpus ingested once into a local folder, with the micro recipe's settings."""
    from schemas.recipe import load_recipe

    recipe = load_recipe(MICRO_RECIPE)
    data = str(tmp_path_factory.mktemp("pool") / "data")
    ingest_corpus(micro_corpus, data, recipe)
    return data
