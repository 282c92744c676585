"""The object-store layer: local and S3 behave alike, writes are atomic, errors are one line."""
import os

import pyarrow as pa
import pytest

from schemas.errors import MatesError
from schemas.storage import join, read_parquet, store_for, write_parquet


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    store = store_for(str(tmp_path))
    store.write_bytes(b"one", "a", "b.txt")
    store.write_bytes(b"two", "a", "b.txt")
    assert store.read_bytes("a", "b.txt") == b"two"
    assert os.listdir(tmp_path / "a") == ["b.txt"]


def test_s3_roundtrip_and_listing(bucket):
    url = join(bucket, "prefix")
    write_parquet(pa.table({"x": [1, 2, 3]}), url, "t", "part-0.parquet")
    assert read_parquet(url, "t", "part-0.parquet").column("x").to_pylist() == [1, 2, 3]
    store = store_for(url)
    assert store.listdir("t") == ["part-0.parquet"]
    assert list(store.walk_files()) == ["t/part-0.parquet"]
    store.remove("t")
    assert not store.exists("t", "part-0.parquet")


def test_missing_object_is_one_line_error(bucket):
    with pytest.raises(MatesError, match="does not exist"):
        store_for(bucket).read_bytes("nope.json")


def test_unreachable_endpoint_fails_fast_with_url(monkeypatch, s3_server):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(MatesError) as info:
        store_for("s3://some-bucket/x").exists("y")
    assert "s3://some-bucket/x" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["", "s3://", "gs://bucket/x"])
def test_bad_urls(url):
    with pytest.raises(MatesError):
        store_for(url)
