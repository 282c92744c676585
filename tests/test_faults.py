"""Object-store faults: a proxy on 127.0.0.1 that fails requests in front of the S3 server."""
import os

import pytest

from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, mates
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow


def _run_through(endpoint: str, data: str, run: str, *extra: str):
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "S3_ENDPOINT_URL": endpoint}
    return mates("run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}", *extra, env=env)


def test_ten_percent_failures_change_nothing(clean_run, s3_pool, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-run-faulty")
    run = "s3://mates-run-faulty/run"
    with FaultProxy(s3_server, failure_rate=0.10, kinds=("500", "503", "reset"), seed=1) as proxy:
        result = _run_through(proxy.url, s3_pool, run)
    assert result.returncode == 0, result.stderr[-3000:]
    injected = sum(v for k, v in proxy.counts.items() if k != "forwarded")
    assert injected >= 10, proxy.counts  # the faults really happened
    clean, _ = clean_run
    for stage in (0, 1):
        a = read_parquet(join(clean, "stages", str(stage)), "selection.parquet")
        b = read_parquet(join(run, "stages", str(stage)), "selection.parquet")
        assert a.equals(b)
    ma = read_parquet(clean, "metrics.parquet").to_pylist()
    mb = read_parquet(run, "metrics.parquet").to_pylist()
    assert [(m["stage"], m["tokens_seen"]) for m in ma] == [(m["stage"], m["tokens_seen"]) for m in mb]
    for x, y in zip(ma, mb):
        assert x["eval_set"] == y["eval_set"] and abs(x["loss"] - y["loss"]) < 1e-5


def test_store_down_for_good_then_resume(s3_pool, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-run-outage")
    run = "s3://mates-run-outage/run"
    short = ("--set", "stages.batches=[4, 2]")  # the outage and the resume, not the training, are tested
    with FaultProxy(s3_server, failure_rate=1.0, kinds=("503",)) as proxy:
        result = _run_through(proxy.url, s3_pool, run, *short)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("mates: error:")]
    assert len(error) == 1 and "s3://mates-" in error[0], result.stderr[-2000:]
    assert not store_for(run).exists("stages", "0", "_SUCCESS")

    result = _run_through(s3_server, s3_pool, run, *short)  # the store is back
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted({m["stage"] for m in read_parquet(run, "metrics.parquet").to_pylist()}) == [-1, 0, 1]
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server
