"""Ingest: documents -> tokenizer -> fixed-length samples -> MDS pool + sample catalog.

Slicing. Each document is tokenized and ends with `<|endoftext|>`; its ids are cut into
consecutive slices of `seq_len` tokens. A slice shorter than `min_tokens` (a short document, or
the tail of a long one) is dropped and counted; other slices are stored at their true length
(the MDS `tokens` column is a variable-length uint16 array, uint32 when the tokenizer has more than
65,536 entries, recorded as `token_dtype` in the pool's `_SUCCESS`; the loader pads a batch and
masks the padding out of the loss). One sample = one slice of one document, so every sample keeps its
document's `source` and can be audited.

Sample ids are consecutive integers in input order (files sorted by name, records in order), so
the same input gives the same ids and the same bytes, with one rank or many.

Parallel. Under the Composer launcher every rank runs `ingest` (see `ranks.py`). Rank 0 trains
the BPE on a deterministic sample of the input (`tokenizer.train_chars`, the first characters of
every file) and hands it to the others. Each input file is one pool part (`pool/part-<file>/`,
its own MDS folder, see `pool_parts.py`); files are dealt to ranks by size, each rank tokenizes
its files, the ranks exchange per-file sample counts, and each part is written with its final
ids, and its catalog rows as `catalog/part-<file>.parquet` (one catalog file per pool part:
readers take the list, curation/store/catalog.py; no rank re-reads every part to write one file).
Rank 0 merges the parts' `index.json` with mosaicml-streaming's `merge_index`.

Atomicity. Everything is built in local scratch folders first; bad input on any rank stops every
rank before any byte reaches `<data>`. Then rank 0 removes any catalog left by an ingest that
died before its `_SUCCESS` (its parts would be read as this pool's), each rank uploads its parts'
shards and catalog files, and rank 0 uploads the tokenizer, target and eval sets, the pool's
`index.json` after every shard and catalog file, and `<data>/_SUCCESS` (with the summary) last. A `<data>` without `_SUCCESS` is not a pool. An eval set that shares a document with a
target or the pool is bad input too (curation/data/sets.py): refused before anything is written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from curation.data import tokenizer as tokmod
from curation.data.pool_parts import (POOL_COLUMNS, FileCounts, catalog_file, catalog_part, part_name,  # noqa: F401
                                      token_dtype, tokenize_file, write_part)
from curation.data.ranks import Ranks
from curation.data.readers import doc_name, input_files, read_file
from curation.data.sets import (EVAL, TARGETS, check_disjoint, read_set_file, refuse_pool_overlap,
                                set_entry, tokenize_set)
from schemas import tables
from schemas.errors import MatesError
from schemas.recipe import IngestConfig, TokenizerConfig
from schemas.storage import store_for, write_fault, write_parquet


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
    tokenize_seconds: float = 0.0   # time inside the tokenizer during ingest (summed over ranks)
    write_seconds: float = 0.0      # tokenize + slice + MDS parts, wall clock (after BPE training)

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


def _tokenizer_sample(files: list[str], budget_chars: int, default_source: str, checked,
                      names: list[str] | None = None) -> Iterator[str]:
    """A deterministic sample to train the BPE on: the first `budget / n_files` characters of
    every file (at least one document each), in file order; the same whatever the ranks."""
    per_file = max(1, budget_chars // len(files))
    for i, file_url in enumerate(files):
        seen = 0
        for doc in checked(read_file(file_url, default_source, names[i] if names else None)):
            yield doc["text"]
            seen += len(doc["text"])
            if seen >= per_file:
                break


def deal(costs: list[int], world_size: int) -> list[list[int]]:
    """Item indices per rank (each list ascending): the costliest item first, each to the least
    loaded rank, ties to the lowest rank and equal costs in item order. Deterministic; every item
    goes to exactly one rank (ingest's files, Group-MATES' k-means groups)."""
    if world_size < 1:
        raise MatesError(f"`world_size` must be >= 1; got {world_size}.")
    loads, hands = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        hands[r].append(i)
        loads[r] += costs[i]
    return [sorted(h) for h in hands]


def assign_files(files: list[str], world_size: int, sizes: list[int] | None = None) -> list[list[int]]:
    """File indices per rank: largest file first to the least loaded rank (ties: lowest rank)."""
    return deal(sizes or [1] * len(files), world_size)


def _file_sizes(files: list[str]) -> list[int]:
    return [store_for(url).size() for url in files]


def _train_or_load_tokenizer(files, tokenizer_cfg, default_source, checked, names=None):
    if tokenizer_cfg.path:
        return tokmod.load_tokenizer_file(tokenizer_cfg.path)
    return tokmod.train_bpe(_tokenizer_sample(files, tokenizer_cfg.train_chars, default_source, checked, names),
                            tokenizer_cfg.vocab_size)


def _merge_index(parts: list[tuple[int, int, dict]], tmp: str) -> str:
    """Rank 0: streaming's own merge of the parts' index.json files (basenames `part-*/shard.*`)."""
    from streaming.base.util import merge_index

    root = os.path.join(tmp, "merged")
    urls = []
    for file_index, _, index in parts:
        part_dir = os.path.join(root, part_name(file_index))
        os.makedirs(part_dir, exist_ok=True)
        with open(os.path.join(part_dir, "index.json"), "w") as handle:
            json.dump(index, handle)
        urls.append(os.path.join(part_dir, "index.json"))
    # merge_index logs two warnings per call (its temp folder, a non-empty `out`) on the root
    # and `streaming` loggers; they describe its normal operation, not a problem of the pool
    loggers = [logging.getLogger(), logging.getLogger("streaming")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        merge_index(urls, root, keep_local=True)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return os.path.join(root, "index.json")


def ingest(input_url: str, data_url: str, *, cfg: IngestConfig, tokenizer_cfg: TokenizerConfig,
           targets: dict[str, str] | None = None, evals: dict[str, str] | None = None,
           default_source: str = "text", force: bool = False,
           progress: Callable | None = None, ranks: Ranks | None = None) -> IngestSummary:
    """Ingest documents at `input_url` into the pool at `data_url`; see the module docstring.

    `targets` / `evals`: {name: JSONL file} of the target and eval sets (curation/data/sets.py).
    Every rank of `ranks` calls this with the same arguments (the default is one process)."""
    ranks = ranks or Ranks()
    started = time.perf_counter()
    store = store_for(data_url)
    store.preflight()
    if store.exists("_SUCCESS") and not force:
        raise MatesError(f"`data` {data_url!r} already holds an ingested pool; pass --force to "
                         f"replace it (runs that read it will no longer match).")
    target_sets = [read_set_file(n, u, "--target") for n, u in (targets or {}).items()]
    eval_sets = [read_set_file(n, u, "--eval") for n, u in (evals or {}).items()]
    eval_hashes = check_disjoint(target_sets, eval_sets)

    def checked(docs):  # every pool document: size limit, and in no eval set
        return refuse_pool_overlap(_checked(docs, cfg.max_doc_chars), eval_hashes)

    files = input_files(input_url)
    names = [doc_name(input_url, f) for f in files]  # ids unique across folders: the relative path
    # rank 0 trains (or loads) the tokenizer on the sample; every rank gets its JSON
    tok_json = ranks.collect(lambda: _train_or_load_tokenizer(files, tokenizer_cfg, default_source, checked, names)
                             .to_str() if ranks.rank == 0 else None)[0]
    tok = tokmod.Tokenizer.from_str(tok_json)
    dtype = token_dtype(tok.get_vocab_size())  # uint32 above 65,536 entries (Llama 3, Qwen style)

    summary = IngestSummary()
    with tempfile.TemporaryDirectory(prefix="mates-ingest-") as tmp:
        mine = assign_files(files, ranks.world_size, _file_sizes(files) if ranks.world_size > 1 else None)[ranks.rank]
        tokenize_start = time.perf_counter()
        def tokenize(i):
            with _scratch(tmp):
                write_fault(os.path.join(tmp, "scratch"))
                return tokenize_file(files[i], i, tok, cfg, tmp, default_source=default_source, checked=checked,
                                     progress=progress, doc_name=names[i], dtype=dtype)

        counts = [c for part in ranks.collect(lambda: [tokenize(i) for i in mine]) for c in part]
        counts.sort(key=lambda c: c.file_index)
        _add_counts(summary, counts)
        if summary.documents == 0:
            raise MatesError(f"`input` {input_url!r} holds no documents; give at least one record with `text`.")
        if not summary.sequences:
            raise MatesError(f"`input` {input_url!r} gave no sample of >= {cfg.min_tokens} tokens "
                             f"(`ingest.min_tokens`); nothing to write.")
        first_ids = dict(zip([c.file_index for c in counts],
                             np.cumsum([0] + [c.samples for c in counts]).tolist()))
        with _scratch(tmp):
            indexes = {k: v for part in ranks.collect(lambda: {i: write_part(i, first_ids[i], cfg, tmp, dtype) for i in mine})
                       for k, v in part.items()}
        parts = [(i, first_ids[i], indexes[i]) for i in sorted(indexes)]
        summary.shards = sum(len(index["shards"]) for _, _, index in parts)
        summary.write_seconds = time.perf_counter() - tokenize_start

        # Commit: nothing above touched <data>. Remove a previous pool only now (with --force).
        if force and ranks.rank == 0:
            store.remove("_SUCCESS")
            for sub in ("pool", TARGETS, EVAL, "embeddings", "tokenizer"):
                store.remove(sub)
        if ranks.rank == 0:  # a dead ingest's catalog files (and its old `_ingest/` scratch) go too
            store.remove("catalog")
            store.remove("_ingest")
        ranks.barrier()
        summary.bytes_written = sum(ranks.collect(lambda: _upload_parts(store, tmp, mine, first_ids, indexes)))
        if ranks.rank == 0:
            tokmod.save_tokenizer(tok, data_url)
            eos = tok.token_to_id(tokmod.EOS)
            for role, sets in ((TARGETS, target_sets), (EVAL, eval_sets)):
                for named in sets:
                    write_parquet(tokenize_set(tok, named, cfg.seq_len, eos), data_url, role, f"{named.name}.parquet")
            store.put_file(_merge_index(parts, tmp), "pool", "index.json")
            summary.seconds = time.perf_counter() - started
            marker = {"format": "mates-pool", "version": 2, "seq_len": cfg.seq_len,
                      "min_tokens": cfg.min_tokens, "vocab_size": tok.get_vocab_size(), "token_dtype": dtype,
                      "sets": {TARGETS: {t.name: set_entry(t) for t in target_sets},
                               EVAL: {e.name: set_entry(e) for e in eval_sets}},
                      "summary": summary.to_dict()}
            store.write_bytes(json.dumps(marker, indent=2).encode(), "_SUCCESS")
        else:  # no rank returns before the pool is committed; polled, since
            store.wait_for("_SUCCESS")  # rank 0's merge grows with the pool (no collective's clock)
    summary.seconds = time.perf_counter() - started
    return summary


@contextlib.contextmanager
def _scratch(tmp: str):
    """Local scratch writes (tokens, catalog columns, MDS parts): a full disk is one line."""
    try:
        yield
    except OSError as exc:
        raise MatesError(f"ingest's local scratch {tmp} could not be written: {exc.strerror or exc} "
                         f"(errno {exc.errno}); free space under TMPDIR (or point TMPDIR elsewhere) "
                         f"and rerun. Nothing was written to `data`.") from exc


def _add_counts(summary: IngestSummary, counts: list[FileCounts]) -> None:
    for c in counts:
        summary.documents += c.documents
        summary.sequences += c.samples
        summary.tokens += c.tokens
        summary.dropped_short += c.dropped_short
        summary.tokenize_seconds += c.tokenize_seconds
        for source, n in c.per_source.items():
            summary.per_source[source] = summary.per_source.get(source, 0) + n
    summary.per_source = dict(sorted(summary.per_source.items()))


def _upload_parts(store, tmp: str, mine: list[int], first_ids: dict, indexes: dict) -> int:
    """Every rank uploads its own parts' shards and catalog files; returns the shards' bytes."""
    written = 0
    for i in mine:
        part_dir = os.path.join(tmp, "pool", part_name(i))
        for name in sorted(os.listdir(part_dir)):
            if name != "index.json":
                written += os.path.getsize(os.path.join(part_dir, name))
                store.put_file(os.path.join(part_dir, name), "pool", part_name(i), name)
        store.put_file(_catalog_file(i, first_ids[i], indexes, tmp), "catalog", catalog_file(i))
    return written


def _catalog_file(file_index: int, first_id: int, indexes: dict, tmp: str) -> str:
    """Part `file_index`'s catalog rows as a local Parquet file (a row group per scratch batch:
    bounded memory); `shard` counts from the shards of the parts before it (the merged index's
    numbering). Returns its path."""
    shard_offset = sum(len(indexes[j]["shards"]) for j in indexes if j < file_index)
    path = os.path.join(tmp, catalog_file(file_index))
    with pq.ParquetWriter(path, tables.CATALOG, compression="zstd") as writer:
        for batch in catalog_part(file_index, first_id, indexes[file_index], tmp, shard_offset):
            writer.write_table(tables.conform(batch, tables.CATALOG))
    return path


def read_pool_marker(data_url: str) -> dict:
    """The `_SUCCESS` marker of an ingested pool; a pool without it does not exist."""
    store = store_for(data_url)
    if not store.exists("_SUCCESS"):
        raise MatesError(f"`data` {data_url!r} holds no ingested pool (no _SUCCESS); run `mates ingest`.")
    marker = json.loads(store.read_bytes("_SUCCESS"))
    marker.setdefault("token_dtype", "uint16")  # pools ingested before the key existed
    return marker
