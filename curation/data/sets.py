"""Named target and evaluation sets (DESIGN.md section 3).

    <data>/targets/<name>.parquet   what curation aims at: the oracle's L_ref, DSIR's target
                                    distribution, the classifier's positives. Read by curation only.
    <data>/eval/<name>.parquet      what the stage loop reports. No curation code reads it.

Both are REFERENCE tables (`input_ids`, `target_start`): the loss counts the tokens at positions
>= `target_start`. A set has one loss kind:

* `lm`: every token of a text (rows {"text"}): `<eos> text`, target_start = 1, so the leading
  end-of-text token is context and every token of the text is predicted;
* `cloze`: LAMBADA style (rows {"context", "target"}): loss on the target word's tokens only.

The kind, the row count and the source file are stamped in the pool's `_SUCCESS` marker
(`sets`), which is where runs look names up; ingest refuses an eval set that shares a document
(by normalised-text sha1) with a target or with the pool, so a method is never scored on the
examples it aimed at.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import pyarrow as pa

from schemas import bounds, tables
from schemas.errors import MatesError
from schemas.storage import read_parquet, store_for

TARGETS, EVAL = "targets", "eval"
KINDS = {"lm": ("text",), "cloze": ("context", "target")}


@dataclass
class NamedSet:
    name: str
    kind: str            # lm | cloze
    rows: list[dict]
    source: str          # the file it was read from


def normalised_sha1(text: str) -> str:
    """sha1 of the text lower-cased with whitespace collapsed: the document identity for overlap."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def example_text(row: dict) -> str:
    """The document an example comes from: the text, or the cloze context followed by its target."""
    return row["text"] if "text" in row else row["context"] + row["target"]


def parse_named_files(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """`["wiki_en=path.jsonl", ...]` -> {name: path}; names are unique and file-name safe."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise MatesError(f"`{flag}` takes NAME=FILE (JSONL with `text`, or `context` + `target`); got {pair!r}.")
        bounds.check_name(name, f"{flag} name")  # before anything is read or written
        if name in out:
            raise MatesError(f"`{flag}` names {name!r} twice.")
        out[name] = path
    return out


def read_set_file(name: str, url: str, flag: str) -> NamedSet:
    """Read one JSONL set; every row must have the fields of one loss kind (all rows the same).

    Bounded: the file's size is checked before it is read (a set is held in memory as rows), and
    each line is read and parsed within the bounds of curation/data/readers.py."""
    from curation.data.readers import bounded_lines, load_record

    parent, base = posixpath.split(url.rstrip("/")) if "://" in url else (None, url)
    store = store_for(parent) if parent else store_for(url)
    parts = (base,) if parent else ()
    try:
        size = store.size(*parts)
        if size > bounds.MAX_SET_BYTES:
            raise MatesError(f"`{flag} {name}`: {url!r} is {size:,} bytes; the bound for a set file is "
                             f"{bounds.MAX_SET_BYTES:,} bytes.")
        stream = store.open_read(*parts)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise MatesError(f"`{flag} {name}`: cannot read {url!r} ({exc}).") from exc
    except MatesError as exc:
        if "bound" in str(exc):
            raise
        raise MatesError(f"`{flag} {name}`: cannot read {url!r} ({exc}).") from exc
    rows, kind = [], None
    with stream:
        for lineno, line in bounded_lines(stream, url):
            if not line.strip():
                continue
            row = load_record(line, f"{url}:{lineno}")
            row_kind = next((k for k, keys in KINDS.items()
                             if isinstance(row, dict) and all(isinstance(row.get(f), str) for f in keys)), None)
            if row_kind is None:
                raise MatesError(f"`{url}:{lineno}` must have a string `text` (lm) or `context` + `target` (cloze).")
            if kind not in (None, row_kind):
                raise MatesError(f"`{url}:{lineno}` is a {row_kind} row in a {kind} set; one kind per file.")
            kind = row_kind
            rows.append({k: row[k] for k in KINDS[row_kind]})
            if b"\\ud" in line or b"\\uD" in line:  # an escaped unpaired surrogate is not text
                for k, v in rows[-1].items():
                    if not v.isascii():
                        try:
                            v.encode("utf-8")
                        except UnicodeEncodeError as exc:
                            raise MatesError(f"`{url}:{lineno}` has an unpaired surrogate in `{k}` at character "
                                             f"{exc.start:,}; it is not valid Unicode text.") from exc
    if not rows:
        raise MatesError(f"`{flag} {name}`: {url!r} holds no rows.")
    return NamedSet(name, kind, rows, url)


def check_disjoint(targets: list[NamedSet], evals: list[NamedSet]) -> dict[str, tuple[str, str]]:
    """Refuse an eval set sharing a document with a target or another eval set.

    Returns {normalised sha1: (eval set, its file)} for the pool-side check during ingest."""
    seen: dict[str, str] = {}
    for t in targets:
        for row in t.rows:
            seen.setdefault(normalised_sha1(example_text(row)), f"target `{t.name}`")
    evals_by_hash: dict[str, tuple[str, str]] = {}
    for e in evals:
        for row in e.rows:
            h = normalised_sha1(example_text(row))
            other = seen.get(h)
            if other and other != f"eval `{e.name}`":
                raise MatesError(f"eval set `{e.name}` ({e.source}) shares a document with {other} "
                                 f"(normalised-text sha1 {h[:12]}); eval sets must be disjoint from targets.")
            seen[h] = f"eval `{e.name}`"
            evals_by_hash[h] = (e.name, e.source)
    return evals_by_hash


def refuse_pool_overlap(docs, evals_by_hash: dict[str, tuple[str, str]]):
    """Pass pool documents through, stopping at the first one that is also in an eval set."""
    for doc in docs:
        if evals_by_hash:
            hit = evals_by_hash.get(normalised_sha1(doc["text"]))
            if hit:
                raise MatesError(f"eval set `{hit[0]}` ({hit[1]}) shares a document with the pool "
                                 f"(`{doc['id']}`); eval sets must be disjoint from the pool.")
        yield doc


def tokenize_set(tok, named: NamedSet, seq_len: int, eos: int) -> pa.Table:
    """Rows of one kind -> a REFERENCE table (cloze contexts are left-truncated to fit)."""
    ids_col, start_col = [], []
    for row in named.rows:
        if named.kind == "cloze":
            target = tok.encode(row["target"]).ids[:seq_len - 1]
            context = ([eos] + tok.encode(row["context"]).ids)[-(seq_len - len(target)):]
            ids_col.append(context + target)
            start_col.append(len(context))
        else:
            ids_col.append(([eos] + tok.encode(row["text"]).ids)[:seq_len])
            start_col.append(1)
    return tables.conform(pa.table({"input_ids": ids_col, "target_start": start_col}), tables.REFERENCE)


def set_entry(named: NamedSet) -> dict:
    return {"kind": named.kind, "examples": len(named.rows), "file": posixpath.basename(named.source)}


# ---------------------------------------------------------------- reading a pool's sets
def pool_sets(marker: dict, role: str) -> dict[str, dict]:
    """{name: {"kind", "examples", "file"}} of the pool's targets or eval sets, in ingest order."""
    return dict(marker.get("sets", {}).get(role, {}))


def default_target(marker: dict) -> str | None:
    """The first full-sequence (lm) target, else the first target; None without targets."""
    targets = pool_sets(marker, TARGETS)
    return next((n for n, e in targets.items() if e["kind"] == "lm"), next(iter(targets), None))


def resolve_target(marker: dict, name: str | None, key: str, data_url: str) -> str:
    """The target a method aims at: `name`, or the pool's default; refused when absent."""
    targets = pool_sets(marker, TARGETS)
    chosen = name or default_target(marker)
    if chosen is None:
        raise MatesError(f"`{key}`: the pool at {data_url} holds no target set; ingest one with "
                         f"`mates ingest --target NAME=FILE`.")
    if chosen not in targets:
        raise MatesError(f"`{key}` must be one of {', '.join(targets)} (the targets of {data_url}); got {chosen!r}.")
    return chosen


def resolve_primary_eval(marker: dict, name: str | None, key: str, data_url: str) -> str:
    """The eval set `mates compare` ranks by: `name`, else the eval set named like the default
    target, else the first full-sequence eval set, else the first."""
    evals = pool_sets(marker, EVAL)
    if not evals:
        raise MatesError(f"the pool at {data_url} holds no eval set; ingest one with `mates ingest --eval NAME=FILE`.")
    if name is None:
        target = default_target(marker)
        name = target if target in evals else next((n for n, e in evals.items() if e["kind"] == "lm"),
                                                   next(iter(evals)))
    if name not in evals:
        raise MatesError(f"`{key}` must be one of {', '.join(evals)} (the eval sets of {data_url}); got {name!r}.")
    return name


def load_set(data_url: str, role: str, name: str) -> pa.Table:
    """The tokenized rows of one set (REFERENCE table)."""
    if not store_for(data_url).exists(role, f"{name}.parquet"):
        raise MatesError(f"`data` {data_url!r} has no {role}/{name}.parquet; re-ingest the pool with "
                         f"`--{'target' if role == TARGETS else 'eval'} {name}=FILE`.")
    return read_parquet(data_url, role, f"{name}.parquet")
