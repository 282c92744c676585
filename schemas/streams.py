"""The streams manifest of a stage index: `<run>/stages/<k>/index/streams.json`.

Layout (format `mates-streams`, version 1):

    {"format": "mates-streams", "version": 1, "stage": 1, "method": "mates",
     "streams": [{"name": "b000", "path": "b000", "remote": "s3://bucket/run/stages/1/index/b000",
                  "proportion": 0.42, "samples": 118}, ...]}

* `path` is the bucket's MDS directory relative to the index folder: a plain name, never
  absolute, never containing `..`. Readers resolve it against the folder they read the manifest
  from, so a run prefix can be copied elsewhere; `remote` is the absolute URL at write time, for
  trainers that want to paste it.
* `proportion` is the bucket's share of the stage's training samples; finite, > 0, summing to 1.
* Next to it, `streams.yaml` holds the same streams as an llm-foundry `streams:` block.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import yaml

from schemas.errors import MatesError

FORMAT = "mates-streams"
VERSION = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, kw_only=True)
class StreamEntry:
    name: str
    path: str
    remote: str
    proportion: float
    samples: int


def check_relative_name(name: str, where: str) -> str:
    """A basename or bucket path must be a plain relative name confined to its root."""
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in name
            or "://" in name or not all(_SAFE_NAME.match(p) for p in name.split("/"))):
        raise MatesError(f"`{where}` must be a plain relative name inside its folder "
                         f"(no '..', no absolute path); got {name!r}.")
    return name


def check_proportion(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise MatesError(f"`{where}` must be a finite number > 0; got {value!r}.")
    return float(value)


def manifest_json(entries: list[StreamEntry], *, stage: int, method: str) -> bytes:
    total = sum(e.proportion for e in entries)
    doc = {"format": FORMAT, "version": VERSION, "stage": stage, "method": method,
           "streams": [dict(name=e.name, path=e.path, remote=e.remote,
                            proportion=e.proportion / total, samples=e.samples) for e in entries]}
    return (json.dumps(doc, indent=2) + "\n").encode()


def foundry_yaml(entries: list[StreamEntry], *, local_root: str = "/tmp/mates-streams") -> bytes:
    """A ready-to-paste llm-foundry `streams:` block (train_loader.dataset.streams)."""
    total = sum(e.proportion for e in entries)
    block = {"streams": {e.name: {"remote": e.remote, "local": f"{local_root}/{e.name}",
                                  "split": None, "proportion": round(e.proportion / total, 8)}
                         for e in entries}}
    return yaml.safe_dump(block, sort_keys=False).encode()


def parse_manifest(data: bytes, where: str) -> list[StreamEntry]:
    """Parse and validate a streams manifest; every problem is a one-line error naming `where`."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MatesError(f"`{where}` is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MatesError(f"`{where}` is not a {FORMAT} manifest (format={doc.get('format') if isinstance(doc, dict) else None!r}).")
    if doc.get("version") != VERSION:
        raise MatesError(f"`{where}` has version {doc.get('version')!r}; this mates reads {VERSION}.")
    streams = doc.get("streams")
    if not isinstance(streams, list) or not streams:
        raise MatesError(f"`{where}` lists no streams.")
    entries = []
    for i, s in enumerate(streams):
        if not isinstance(s, dict):
            raise MatesError(f"`{where}` streams[{i}] is not an object.")
        entries.append(StreamEntry(
            name=check_relative_name(s.get("name"), f"{where} streams[{i}].name"),
            path=check_relative_name(s.get("path"), f"{where} streams[{i}].path"),
            remote=str(s.get("remote", "")),
            proportion=check_proportion(s.get("proportion"), f"{where} streams[{i}].proportion"),
            samples=int(s.get("samples", 0)),
        ))
    return entries
