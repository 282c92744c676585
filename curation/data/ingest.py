"""Ingest: documents -> tokenizer -> fixed-length samples -> MDS pool + sample catalog.

Slicing. Each document is tokenized and ends with `<|endoftext|>`; its ids are cut into
consecutive slices of `seq_len` tokens. A slice shorter than `min_tokens` (a short document, or
the tail of a long one) is dropped and counted; other slices are stored at their true length
(the MDS `tokens` column is a variable-length uint16 array; the loader pads a batch and masks
the padding out of the loss). One sample = one slice of one document, so every sample keeps its
document's `source` and can be audited.

Sample ids are consecutive integers in input order (files sorted by name, records in order), so
the same input gives the same ids and the same bytes.

Atomicity. Everything is built in a local scratch folder first; bad input stops before any byte
reaches `<data>` (an eval set that shares a document with a target or the pool is such input,
see curation/data/sets.py). Then the tokenizer, target and eval sets, shards and catalog are uploaded, the pool's
`index.json` after its shards, and `<data>/_SUCCESS` (with the summary) last. A `<data>` without
`_SUCCESS` is not a pool.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from curation.data import tokenizer as tokmod
from curation.data.readers import read_documents
from curation.data.sets import (EVAL, TARGETS, check_disjoint, read_set_file, refuse_pool_overlap,
                                set_entry, tokenize_set)
from schemas import tables
from schemas.errors import MatesError
from schemas.recipe import IngestConfig, TokenizerConfig
from schemas.storage import store_for, write_parquet

POOL_COLUMNS = {"tokens": "ndarray:uint16", "sample_id": "int64"}
PREVIEW_CHARS = 160


@dataclass
class IngestSummary:
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    dropped_short: int = 0          # slices under min_tokens (short docs and tails)
    per_source: dict = field(default_factory=dict)
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    tokenize_seconds: float = 0.0   # time inside the tokenizer during ingest

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s}


def _checked(docs: Iterator[dict], max_chars: int) -> Iterator[dict]:
    for doc in docs:
        if len(doc["text"]) > max_chars:
            raise MatesError(f"document `{doc['id']}` has {len(doc['text']):,} characters; "
                             f"`ingest.max_doc_chars` is {max_chars:,}. Split it or raise the limit.")
        yield doc


def _batches(docs: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def slice_document(ids: list[int], offsets: list[tuple[int, int]], text: str, eos: int,
                   seq_len: int, min_tokens: int) -> tuple[list[tuple[list[int], str]], int]:
    """Cut one document's ids (+ EOS) into slices; return [(ids, text span)], number dropped."""
    ids = list(ids) + [eos]
    out, dropped = [], 0
    for start in range(0, len(ids), seq_len):
        chunk = ids[start:start + seq_len]
        if len(chunk) < min_tokens:
            dropped += 1
            continue
        last = min(start + len(chunk), len(offsets)) - 1
        span = text[offsets[start][0]:offsets[last][1]] if start < len(offsets) else ""
        out.append((chunk, span))
    return out, dropped


def _write_pool(docs: Iterator[dict], tok, cfg: IngestConfig, out_dir: str, summary: IngestSummary,
                progress: Callable | None) -> list[dict]:
    """Tokenize, slice and write MDS shards into `out_dir`; return catalog rows (no shard yet)."""
    from streaming import MDSWriter

    eos = tok.token_to_id(tokmod.EOS)
    rows: list[dict] = []
    with MDSWriter(out=out_dir, columns=POOL_COLUMNS, compression=None, hashes=["sha1"],
                   size_limit=cfg.shard_size_limit, progress_bar=False) as writer:
        for batch in _batches(docs, cfg.batch_docs):
            t0 = time.perf_counter()
            encodings = tok.encode_batch([d["text"] for d in batch])
            summary.tokenize_seconds += time.perf_counter() - t0
            for doc, enc in zip(batch, encodings):
                slices, dropped = slice_document(enc.ids, enc.offsets, doc["text"], eos,
                                                 cfg.seq_len, cfg.min_tokens)
                summary.documents += 1
                summary.dropped_short += dropped
                for chunk_ix, (chunk, span) in enumerate(slices):
                    sample_id = len(rows)
                    writer.write({"tokens": np.asarray(chunk, dtype=np.uint16), "sample_id": sample_id})
                    rows.append({"sample_id": sample_id, "doc_id": doc["id"], "chunk": chunk_ix,
                                 "n_tokens": len(chunk), "source": doc["source"],
                                 "text_sha1": hashlib.sha1(span.encode("utf-8")).hexdigest(),
                                 "preview": span[:PREVIEW_CHARS]})
                    summary.tokens += len(chunk)
                    summary.per_source[doc["source"]] = summary.per_source.get(doc["source"], 0) + 1
            if progress:
                progress(len(batch), summary)
    summary.sequences = len(rows)
    return rows


def _assign_shards(rows: list[dict], index_path: str) -> int:
    """Fill `shard` / `index_in_shard` from index.json's per-shard sample counts."""
    with open(index_path) as handle:
        shards = json.load(handle)["shards"]
    starts = np.cumsum([0] + [s["samples"] for s in shards]).tolist()
    for row in rows:
        shard = bisect.bisect_right(starts, row["sample_id"]) - 1
        row["shard"], row["index_in_shard"] = shard, row["sample_id"] - starts[shard]
    return len(shards)


def ingest(input_url: str, data_url: str, *, cfg: IngestConfig, tokenizer_cfg: TokenizerConfig,
           targets: dict[str, str] | None = None, evals: dict[str, str] | None = None,
           default_source: str = "text", force: bool = False,
           progress: Callable | None = None) -> IngestSummary:
    """Ingest documents at `input_url` into the pool at `data_url`; see the module docstring."""
    started = time.perf_counter()
    store = store_for(data_url)
    store.preflight()
    if store.exists("_SUCCESS") and not force:
        raise MatesError(f"`data` {data_url!r} already holds an ingested pool; pass --force to "
                         f"replace it (runs that read it will no longer match).")
    target_sets = [read_set_file(n, u, "--target") for n, u in (targets or {}).items()]
    eval_sets = [read_set_file(n, u, "--eval") for n, u in (evals or {}).items()]
    eval_hashes = check_disjoint(target_sets, eval_sets)

    def docs():  # read twice: once to train the tokenizer, once to slice
        return _checked(read_documents(input_url, default_source), cfg.max_doc_chars)
    if tokenizer_cfg.path:
        tok = tokmod.load_tokenizer_file(tokenizer_cfg.path)
    else:
        tok = tokmod.train_bpe((d["text"] for d in docs()), tokenizer_cfg.vocab_size)
    if tok.get_vocab_size() > 65536:
        raise MatesError(f"`tokenizer.path` has {tok.get_vocab_size()} tokens; the uint16 pool holds at most 65536.")

    summary = IngestSummary()
    with tempfile.TemporaryDirectory(prefix="mates-ingest-") as tmp:
        pool_dir = os.path.join(tmp, "pool")
        rows = _write_pool(refuse_pool_overlap(docs(), eval_hashes), tok, cfg, pool_dir, summary, progress)
        if not rows:
            raise MatesError(f"`input` {input_url!r} gave no sample of >= {cfg.min_tokens} tokens "
                             f"(`ingest.min_tokens`); nothing to write.")
        summary.shards = _assign_shards(rows, os.path.join(pool_dir, "index.json"))
        catalog = tables.conform(pa.Table.from_pylist(rows), tables.CATALOG)

        # Commit: nothing above touched <data>. Remove a previous pool only now (with --force).
        if force:
            store.remove("_SUCCESS")
            for sub in ("pool", "catalog", TARGETS, EVAL, "embeddings", "tokenizer"):
                store.remove(sub)
        tokmod.save_tokenizer(tok, data_url)
        eos = tok.token_to_id(tokmod.EOS)
        for role, sets in ((TARGETS, target_sets), (EVAL, eval_sets)):
            for named in sets:
                write_parquet(tokenize_set(tok, named, cfg.seq_len, eos), data_url, role, f"{named.name}.parquet")
        for name in sorted(os.listdir(pool_dir)):
            if name != "index.json":
                summary.bytes_written += os.path.getsize(os.path.join(pool_dir, name))
                store.put_file(os.path.join(pool_dir, name), "pool", name)
        write_parquet(catalog, data_url, "catalog", "samples.parquet")
        store.put_file(os.path.join(pool_dir, "index.json"), "pool", "index.json")
    summary.seconds = time.perf_counter() - started
    marker = {"format": "mates-pool", "version": 1, "seq_len": cfg.seq_len,
              "min_tokens": cfg.min_tokens, "vocab_size": tok.get_vocab_size(),
              "sets": {TARGETS: {t.name: set_entry(t) for t in target_sets},
                       EVAL: {e.name: set_entry(e) for e in eval_sets}},
              "summary": summary.to_dict()}
    store.write_bytes(json.dumps(marker, indent=2).encode(), "_SUCCESS")
    return summary


def read_pool_marker(data_url: str) -> dict:
    """The `_SUCCESS` marker of an ingested pool; a pool without it does not exist."""
    store = store_for(data_url)
    if not store.exists("_SUCCESS"):
        raise MatesError(f"`data` {data_url!r} holds no ingested pool (no _SUCCESS); run `mates ingest`.")
    return json.loads(store.read_bytes("_SUCCESS"))
