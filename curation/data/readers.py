"""Readers: JSONL, Parquet and plain-text documents from a local path or `s3://`.

A document is {"id", "text", "source"}. `id` defaults to `<file>:<line>` and `source` to the
reader's `default_source`; `text` is required. Bad input stops with a one-line error naming the
file and line: a record without `text`, text that is not valid UTF-8, or no documents at all.
"""
from __future__ import annotations

import io
import json
import posixpath
from typing import Iterator

from schemas.errors import MatesError
from schemas.storage import store_for

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _doc(record: dict, where: str, default_id: str, default_source: str) -> dict:
    text = record.get("text")
    if not isinstance(text, str):
        raise MatesError(f"`{where}` has no string `text` field (keys: {sorted(record)}).")
    return {"id": str(record.get("id", default_id)), "text": text,
            "source": str(record.get("source") or default_source)}


def _jsonl(data: bytes, name: str, default_source: str) -> Iterator[dict]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MatesError(f"`{where}` is not valid UTF-8 (byte {exc.start}); re-encode the file.") from exc
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise MatesError(f"`{where}` is not valid JSON: {exc.msg}.") from exc
        if not isinstance(record, dict):
            raise MatesError(f"`{where}` is not a JSON object.")
        yield _doc(record, where, where, default_source)


def _parquet(data: bytes, name: str, default_source: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    if "text" not in table.column_names:
        raise MatesError(f"`{name}` has no `text` column (columns: {table.column_names}).")
    for row, record in enumerate(table.to_pylist()):
        yield _doc(record, f"{name}:row {row}", f"{name}:{row}", default_source)


def _text(data: bytes, name: str, default_source: str) -> Iterator[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MatesError(f"`{name}` is not valid UTF-8 (byte {exc.start}); re-encode the file.") from exc
    yield {"id": name, "text": text, "source": default_source}


_READERS = {".jsonl": _jsonl, ".json": _jsonl, ".parquet": _parquet, ".txt": _text}


def input_files(url: str) -> list[str]:
    """The input files a path names: the file itself, or every readable file under a folder."""
    store = store_for(url)
    if store.fs.isfile(store.root):
        if not url.endswith(SUFFIXES):
            raise MatesError(f"`input` {url!r} must end with one of {', '.join(SUFFIXES)}.")
        return [url]
    if not store.exists():
        raise MatesError(f"`input` {url!r} does not exist.")
    files = [store.url_of(rel) for rel in store.walk_files() if rel.endswith(SUFFIXES)]
    if not files:
        raise MatesError(f"`input` {url!r} holds no {', '.join(SUFFIXES)} files.")
    return files


def read_documents(url: str, default_source: str = "text") -> Iterator[dict]:
    """Every document under `url`, in file order then record order; errors if there are none."""
    count = 0
    for file_url in input_files(url):
        parent, name = posixpath.split(file_url)
        data = store_for(parent).read_bytes(name)
        reader = _READERS[posixpath.splitext(name)[1]]
        for doc in reader(data, name, default_source):
            count += 1
            yield doc
    if count == 0:
        raise MatesError(f"`input` {url!r} holds no documents; give at least one record with `text`.")
