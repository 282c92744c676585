"""One input file -> one pool part: tokenize and slice (phase 1), then MDS + catalog (phase 2).

Why two phases. A sample's id is stored inside its MDS shard, and ids are consecutive in
(file order, record order) whatever the number of ranks; a file's first id is only known once
every earlier file has been counted, possibly by another rank. So phase 1 tokenizes a file into
local scratch (uint16 or uint32 tokens appended to a flat file, slice lengths, catalog columns in a Parquet
file: bounded memory), the ranks exchange their per-file counts, and phase 2 writes the file's
MDS folder `part-<file>/` with its final ids. Each part's bytes depend only on the file and its
first id, so 1 rank and N ranks write the same bytes.

The per-slice work is kept in C where it can be: token ids go to numpy in one call per batch,
slice lengths come from arithmetic, catalog columns are built as lists and written per batch.
"""
from __future__ import annotations

import array
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.data.readers import read_file
from schemas.errors import MatesError

UINT16_VOCAB = 65_536  # up to this many tokenizer entries tokens are uint16; above, uint32


def token_dtype(vocab_size: int) -> str:
    """The pool's token dtype for a vocabulary of `vocab_size` entries (recorded in its stamp)."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"


def pool_columns(dtype: str = "uint16") -> dict[str, str]:
    return {"tokens": f"ndarray:{dtype}", "sample_id": "int64"}


POOL_COLUMNS = pool_columns("uint16")  # pools ingested before `token_dtype` was stamped
PREVIEW_CHARS = 160
READ_SAMPLES = 1 << 16  # samples per block when phase 2 reads the scratch tokens back
SCRATCH_SCHEMA = pa.schema([("doc_id", pa.string()), ("chunk", pa.int32()), ("n_tokens", pa.int32()),
                            ("source", pa.string()), ("text_sha1", pa.string()), ("preview", pa.string())])


@dataclass
class FileCounts:
    """What phase 1 learned about one file (sent to every rank)."""

    file_index: int
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    dropped_short: int = 0
    per_source: dict = field(default_factory=dict)
    tokenize_seconds: float = 0.0


def _part_paths(scratch: str, file_index: int) -> dict[str, str]:
    stem = os.path.join(scratch, f"file-{file_index:05d}")
    return {"tokens": stem + ".tokens", "lengths": stem + ".lengths.npy", "catalog": stem + ".catalog.parquet",
            "mds": os.path.join(scratch, "pool", part_name(file_index))}


def part_name(file_index: int) -> str:
    return f"part-{file_index:05d}"


def catalog_file(file_index: int) -> str:
    """The name of pool part `file_index`'s catalog file under `<data>/catalog/`."""
    return f"{part_name(file_index)}.parquet"


CATALOG_FILE = re.compile(r"part-(\d+)\.parquet")   # catalog_file's names; group 1: the file index


def slice_bounds(n_ids: int, seq_len: int, min_tokens: int) -> tuple[list[int], int]:
    """Starts of the kept slices of a document of `n_ids` ids (EOS included), and how many drop."""
    starts = list(range(0, n_ids, seq_len))
    if starts and n_ids - starts[-1] < min_tokens:  # only the last slice can be short
        return starts[:-1], 1
    return starts, 0


def tokenize_file(file_url: str, file_index: int, tok, cfg, scratch: str, *, default_source: str,
                  checked, progress=None, doc_name: str | None = None, dtype: str = "uint16") -> FileCounts:
    """Phase 1: the documents of one file -> scratch tokens, slice lengths and catalog columns.
    `doc_name`: the file's path under `--input` (readers.doc_name), the stem of default doc ids."""
    eos = tok.token_to_id("<|endoftext|>")
    paths = _part_paths(scratch, file_index)
    counts = FileCounts(file_index)
    lengths = array.array("i")  # 4 bytes per sample, not a Python int each
    seq_len, min_tokens = cfg.seq_len, cfg.min_tokens
    with open(paths["tokens"], "wb") as tokens_out, \
            pq.ParquetWriter(paths["catalog"], SCRATCH_SCHEMA, compression="none") as catalog_out:
        batch: list[dict] = []
        docs = checked(read_file(file_url, default_source, doc_name))
        while True:
            batch.clear()
            for doc in docs:
                batch.append(doc)
                if len(batch) == cfg.batch_docs:
                    break
            if not batch:
                break
            t0 = time.perf_counter()
            encodings = tok.encode_batch([d["text"] for d in batch])
            counts.tokenize_seconds += time.perf_counter() - t0
            columns = {name: [] for name in SCRATCH_SCHEMA.names}
            kept: list[int] = []  # every kept id of the batch, flat (list.extend runs in C)
            for doc, enc in zip(batch, encodings):
                ids = enc.ids
                ids.append(eos)
                starts, dropped = slice_bounds(len(ids), seq_len, min_tokens)
                counts.documents += 1
                counts.dropped_short += dropped
                if not starts:
                    continue
                text, offsets = doc["text"], enc.offsets
                n_text = len(offsets)  # the EOS has no offset
                end = min(starts[-1] + seq_len, len(ids))
                kept.extend(ids if end == len(ids) else ids[:end])
                for chunk, start in enumerate(starts):
                    stop = min(start + seq_len, len(ids))
                    span = text[offsets[start][0]:offsets[min(stop, n_text) - 1][1]] if start < n_text else ""
                    lengths.append(stop - start)
                    columns["doc_id"].append(doc["id"])
                    columns["chunk"].append(chunk)
                    columns["n_tokens"].append(stop - start)
                    columns["source"].append(doc["source"])
                    columns["text_sha1"].append(hashlib.sha1(span.encode("utf-8")).hexdigest())
                    columns["preview"].append(span[:PREVIEW_CHARS])
                counts.per_source[doc["source"]] = counts.per_source.get(doc["source"], 0) + len(starts)
            if kept:
                flat = np.array(kept, dtype=dtype)
                tokens_out.write(flat.tobytes())
                counts.tokens += int(flat.size)
            if columns["doc_id"]:
                catalog_out.write_table(pa.table(columns, schema=SCRATCH_SCHEMA))
            if progress:
                progress(len(batch), counts)
    np.save(paths["lengths"], np.frombuffer(lengths, dtype=np.int32) if lengths else np.zeros(0, np.int32))
    counts.samples = len(lengths)
    return counts


def write_part(file_index: int, first_id: int, cfg, scratch: str, dtype: str = "uint16") -> dict:
    """Phase 2: one file's MDS folder with ids from `first_id`; returns its index.json dict."""
    import json

    from streaming import MDSWriter

    paths = _part_paths(scratch, file_index)
    lengths = np.load(paths["lengths"])
    if int(lengths.sum()) * np.dtype(dtype).itemsize != os.path.getsize(paths["tokens"]):
        raise MatesError(f"ingest scratch for file {file_index} is inconsistent (disk full?).")
    with MDSWriter(out=paths["mds"], columns=pool_columns(dtype), compression=None, hashes=["sha1"],
                   size_limit=cfg.shard_size_limit, progress_bar=False) as writer, \
            open(paths["tokens"], "rb") as tokens_in:
        for block in range(0, lengths.size, READ_SAMPLES):  # bounded memory: a block at a time
            block_lengths = lengths[block:block + READ_SAMPLES]
            tokens = np.fromfile(tokens_in, dtype=dtype, count=int(block_lengths.sum()))
            start = 0
            for j, end in enumerate(np.cumsum(block_lengths).tolist(), start=first_id + block):
                writer.write({"tokens": tokens[start:end], "sample_id": j})
                start = end
    os.remove(paths["tokens"])
    with open(os.path.join(paths["mds"], "index.json")) as handle:
        return json.load(handle)


def catalog_part(file_index: int, first_id: int, index: dict, scratch: str, shard_offset: int = 0) -> Iterator[pa.Table]:
    """The catalog rows of one part, a row group at a time (bounded memory), with sample_id and
    (shard, index_in_shard); `shard_offset` is the number of shards of the parts before it."""
    parquet = pq.ParquetFile(_part_paths(scratch, file_index)["catalog"])
    per_shard = np.asarray([s["samples"] for s in index["shards"]], dtype=np.int64)
    shard_starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
    row = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        local = np.arange(row, row + table.num_rows, dtype=np.int64)
        shard = np.searchsorted(shard_starts, local, side="right") - 1
        yield table.append_column("sample_id", pa.array(first_id + local)) \
            .append_column("shard", pa.array(shard + shard_offset)) \
            .append_column("index_in_shard", pa.array(local - shard_starts[shard]))
        row += table.num_rows
