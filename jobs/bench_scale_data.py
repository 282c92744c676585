"""The synthetic `<data>` folder of `mates bench scale`: N samples written with numpy, not ingest.

    <dir>/n<N>/data/
      pool/part-<p>/shard.<s>.mds   MDS shards, byte for byte what `MDSWriter` writes (columns
                                    sample_id: int64, tokens: ndarray:uint16; sha1 in index.json;
                                    no compression), `shard_bytes` per shard (default 32 MiB, split
                                    by MDSWriter's own rule); one part per `part_samples` ids (2^20)
      pool/index.json               the merged index (basenames `part-<p>/shard.<s>.mds`, as ingest's)
      catalog/part-<p>.parquet      one per pool part, as ingest writes them; schemas/tables.py CATALOG, zstd, row groups of 2^17 rows: 4
                                    slices per `syn-<doc>` document, 5 sources (web 40%, code 20%,
                                    books 15%, wiki 15%, papers 10%), a random 40-hex `text_sha1` with
                                    1% exact duplicates, a 160-character lowercase `preview`
      embeddings/<key>/             the frozen backbone's store (curation/influence/embeddings.py):
                                    its stamp for these settings and this pool's index.json, parts of
                                    `embedding_part` ids (default the store's 2,048) of fp16 x 384;
                                    rows are topic centres + noise (64 topics), not encoder output
      tokenizer/, targets/syn.parquet, eval/syn_eval.parquet, _SUCCESS
                                    a 512-entry BPE trained on a few synthetic lines, 64 random
                                    target and eval rows of `seq_len` tokens, the pool marker
    <dir>/n<N>/state.pt             a probe state of a tiny GPT-2 (d 32, 2 layers, 5 AdamW steps)
    <dir>/n<N>/bench_scale_data.json   the stamp, written last: a folder whose stamp matches the
                                    settings asked for is reused (generating 10^7 is the slow part)

Every sample holds `seq_len` (64) random tokens in 1..511: tokens need not be text, and a fixed
length makes a sample's MDS record 142 bytes. Each writer is one function (`write_pool`,
`write_catalog`, `write_embedding_store`) so a change of those formats is one place here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import tables
from schemas.errors import MatesError

FORMAT, VERSION = "mates-bench-scale-data", 2
VOCAB = 512
DIM = 384
SOURCES = (("web", 0.40), ("code", 0.20), ("books", 0.15), ("wiki", 0.15), ("papers", 0.10))
ROW_GROUP = 1 << 17
TARGET = "syn"


def settings(n: int, *, seq_len: int = 64, shard_bytes: int = 32 << 20, part_samples: int = 1 << 20,
             embedding_part: int = 2048, seed: int = 0) -> dict:
    if not 8 <= seq_len <= 255:  # one uint8 shape byte in the MDS record (see _record_dtype)
        raise MatesError(f"`seq_len` must be in 8..255 for the synthetic pool; got {seq_len}.")
    return {"format": FORMAT, "version": VERSION, "n": int(n), "seq_len": seq_len, "shard_bytes": int(shard_bytes),
            "part_samples": int(part_samples), "embedding_part": int(embedding_part), "seed": int(seed)}


# ---------------------------------------------------------------- pool (MDS)
def _record_dtype(seq_len: int) -> np.dtype:
    """One MDS sample: [u32 size of tokens] [sample_id i64] [tokens: ndim<<2|uint8, shape, values]."""
    return np.dtype([("size", "<u4"), ("sample_id", "<i8"), ("ndim", "u1"), ("shape", "u1"),
                     ("tokens", "<u2", (seq_len,))])


def _mds_config(shard_bytes: int) -> bytes:
    """The JSON MDSWriter writes into every shard (its `get_config`, keys sorted)."""
    return json.dumps({"column_encodings": ["int64", "ndarray:uint16"], "column_names": ["sample_id", "tokens"],
                       "column_sizes": [8, None], "compression": None, "format": "mds", "hashes": ["sha1"],
                       "size_limit": shard_bytes, "version": 2}, sort_keys=True).encode()


def write_pool(pool_dir: str, n: int, *, seq_len: int, shard_bytes: int, part_samples: int,
               rng: np.random.Generator) -> list[dict]:
    """MDS shards of samples 0..n-1 under `pool_dir` and the merged index.json; returns its shards."""
    rec = _record_dtype(seq_len)
    config = _mds_config(shard_bytes)
    # MDSWriter starts a new shard when 8 + len(config) + sum(record + 4) would pass size_limit
    per_shard = (shard_bytes - 8 - len(config)) // (rec.itemsize + 4)
    if per_shard < 1:
        raise MatesError(f"`shard_bytes` {shard_bytes} holds no sample of {rec.itemsize} bytes.")
    shards = []
    for part, first in enumerate(range(0, n, part_samples)):
        part_dir = os.path.join(pool_dir, f"part-{part:05d}")
        os.makedirs(part_dir, exist_ok=True)
        part_shards = []
        last = min(n, first + part_samples)
        for s, lo in enumerate(range(first, last, per_shard)):
            m = min(per_shard, last - lo)
            records = np.empty(m, rec)
            records["size"], records["ndim"], records["shape"] = 2 + 2 * seq_len, (1 << 2) | 0, seq_len
            records["sample_id"] = np.arange(lo, lo + m)
            records["tokens"] = rng.integers(1, VOCAB, (m, seq_len), dtype=np.uint16)
            offsets = 4 + 4 * (m + 1) + len(config) + rec.itemsize * np.arange(m + 1, dtype=np.uint32)
            data = np.uint32(m).tobytes() + offsets.astype(np.uint32).tobytes() + config + records.tobytes()
            name = f"shard.{s:05d}.mds"
            with open(os.path.join(part_dir, name), "wb") as out:
                out.write(data)
            part_shards.append({"column_encodings": ["int64", "ndarray:uint16"], "column_names": ["sample_id", "tokens"],
                                "column_sizes": [8, None], "compression": None, "format": "mds", "hashes": ["sha1"],
                                "raw_data": {"basename": name, "bytes": len(data),
                                             "hashes": {"sha1": hashlib.sha1(data).hexdigest()}},
                                "samples": m, "size_limit": shard_bytes, "version": 2, "zip_data": None})
        with open(os.path.join(part_dir, "index.json"), "w") as out:
            json.dump({"version": 2, "shards": part_shards}, out, sort_keys=True)
        for shard in part_shards:
            shards.append(json.loads(json.dumps(shard)))
            shards[-1]["raw_data"]["basename"] = f"part-{part:05d}/{shard['raw_data']['basename']}"
    with open(os.path.join(pool_dir, "index.json"), "w") as out:
        json.dump({"version": 2, "shards": shards}, out, sort_keys=True)
    return shards


# ---------------------------------------------------------------- catalog
def _fixed_strings(rows: np.ndarray) -> pa.Array:
    """[n, L] uint8 ASCII -> a string array (one buffer, no Python string per row)."""
    n, width = rows.shape
    offsets = (np.arange(n + 1, dtype=np.int64) * width).astype(np.int32 if n * width < 2 ** 31 else np.int64)
    kind = pa.string() if offsets.dtype == np.int32 else pa.large_string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows))])


def write_catalog(data_dir: str, n: int, shards: list[dict], rng: np.random.Generator,
                  part_samples: int = 1 << 20) -> None:
    """<data>/catalog/part-<p>.parquet, one per pool part of `part_samples` ids, with the CATALOG
    schema, a row group of ROW_GROUP rows at a time."""
    per_shard = np.asarray([s["samples"] for s in shards], dtype=np.int64)
    shard_starts = np.concatenate([[0], np.cumsum(per_shard)])
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    text = letters[rng.integers(0, len(letters), 1 << 20)]                   # previews are windows of it
    windows = np.lib.stride_tricks.sliding_window_view(text, 160)
    names = pa.array([s for s, _ in SOURCES])
    weights = np.asarray([w for _, w in SOURCES])
    os.makedirs(os.path.join(data_dir, "catalog"), exist_ok=True)
    for part, start in enumerate(range(0, n, part_samples)):
        path = os.path.join(data_dir, "catalog", f"part-{part:05d}.parquet")
        with pq.ParquetWriter(path + ".tmp", tables.CATALOG, compression="zstd") as writer:
            for lo in range(start, min(n, start + part_samples), ROW_GROUP):
                ids = np.arange(lo, min(n, start + part_samples, lo + ROW_GROUP), dtype=np.int64)
                m = len(ids)
                shard = np.searchsorted(shard_starts, ids, side="right") - 1
                digest = rng.integers(0, 256, (m, 20), dtype=np.uint8)
                dup = rng.random(m) < 0.01                                        # 1% repeat another row's text
                digest[dup] = digest[rng.integers(0, m, int(dup.sum()))]
                sha = np.stack([hexdigits[digest >> 4], hexdigits[digest & 15]], axis=2).reshape(m, 40)
                source = pa.DictionaryArray.from_arrays(pa.array(rng.choice(len(SOURCES), m, p=weights).astype(np.int32)),
                                                        names).dictionary_decode()
                doc = pa.compute.binary_join_element_wise("syn-", pa.array(ids // 4).cast(pa.string()), "")
                table = pa.Table.from_arrays([
                    pa.array(ids), doc, pa.array((ids % 4).astype(np.int32)), pa.array(shard.astype(np.int32)),
                    pa.array((ids - shard_starts[shard]).astype(np.int32)), pa.array(np.full(m, 64, np.int32)),
                    source, _fixed_strings(sha), _fixed_strings(windows[rng.integers(0, len(windows), m)])],
                    schema=tables.CATALOG)
                writer.write_table(table)
        os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- embedding store
def embedding_settings():
    """The store `mates@frozen` / `group_mates@frozen` ask for with the bench's options (fp16)."""
    from curation.influence.embeddings import EmbeddingSettings

    return EmbeddingSettings.from_options(method_options("mates"), dtype="float16")


def write_embedding_store(data_dir: str, n: int, part: int, rng: np.random.Generator) -> str:
    """The frozen backbone's store of every sample (stamp first, then parts); returns its folder."""
    from curation.influence.embeddings import STAMP, EmbeddingStore

    store = EmbeddingStore(data_dir, embedding_settings(), part_size=part)
    folder = store.store.root
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, STAMP), "w") as out:    # what `ensure` stamps a new store with
        json.dump(store._expected(DIM), out, indent=2)
    schema = tables.embeddings_schema(DIM, "float16")
    centres = rng.standard_normal((64, DIM), dtype=np.float32)
    for lo in range(0, n, part):
        ids = np.arange(lo, min(n, lo + part), dtype=np.int64)
        emb = centres[rng.integers(0, 64, len(ids))] + rng.standard_normal((len(ids), DIM), dtype=np.float32)
        values = pa.array(emb.astype(np.float16).ravel())
        column = pa.FixedSizeListArray.from_arrays(values, DIM).cast(schema.field("embedding").type)
        name = f"part-{lo:09d}-{int(ids[-1]):09d}-{hashlib.sha1(ids.tobytes()).hexdigest()[:10]}.parquet"  # the store's naming
        # zstd as the store writes; no dictionary attempt (random fp16 never keeps one): 1.6x faster
        pq.write_table(pa.Table.from_arrays([pa.array(ids), column], schema=schema), os.path.join(folder, name),
                       compression="zstd", use_dictionary=False)
    return folder


# ---------------------------------------------------------------- the rest of a <data> folder
def method_options(method: str, n_probes: int = 256):
    """The options of one boundary: frozen backbone over fp16 embeddings, forward probes."""
    from schemas.method_options import GroupMatesOptions, MatesOptions

    common = dict(backbone="frozen", embedding_dtype="float16", probe_method="forward", n_probes=n_probes,
                  probe_batch=32, max_target=32)
    if method == "group_mates":
        return GroupMatesOptions(**common, n_trajectories=16, trajectory_length=10, trajectory_reference=8)
    return MatesOptions(**common)


def _sets_and_marker(data_dir: str, cfg: dict, n_shards: int, rng: np.random.Generator) -> None:
    from curation.data.sets import EVAL, TARGETS
    from curation.data.tokenizer import save_tokenizer, train_bpe

    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(2000)]
    save_tokenizer(train_bpe([" ".join(words[i:i + 20]) for i in range(0, 2000, 20)] * 5, VOCAB), data_dir)
    seq = cfg["seq_len"]
    for role, name in ((TARGETS, TARGET), (EVAL, TARGET + "_eval")):
        ids = [[0] + rng.integers(1, VOCAB, seq - 1).tolist() for _ in range(64)]
        table = tables.conform(pa.table({"input_ids": ids, "target_start": [1] * 64}), tables.REFERENCE)
        os.makedirs(os.path.join(data_dir, role), exist_ok=True)
        pq.write_table(table, os.path.join(data_dir, role, f"{name}.parquet"))
    n = cfg["n"]
    marker = {"format": "mates-pool", "version": 2, "seq_len": seq, "min_tokens": 8, "vocab_size": VOCAB,
              "token_dtype": "uint16", "synthetic": FORMAT,
              "sets": {TARGETS: {TARGET: {"kind": "lm", "examples": 64, "file": "syn.jsonl"}},
                       EVAL: {TARGET + "_eval": {"kind": "lm", "examples": 64, "file": "syn_eval.jsonl"}}},
              "summary": {"documents": (n + 3) // 4, "sequences": n, "tokens": n * seq, "dropped_short": 0,
                          "shards": n_shards, "per_source": {}}}
    with open(os.path.join(data_dir, "_SUCCESS"), "w") as out:
        json.dump(marker, out, indent=2)


def _probe_state(path: str) -> None:
    from jobs.bench_probe import toy_probe_state
    from schemas.probe_state import save_probe_state
    from schemas.recipe import ModelConfig

    state = toy_probe_state(ModelConfig(name="gpt2", d_model=32, n_layers=2, n_heads=2, max_seq_len=64), VOCAB)
    save_probe_state(state, os.path.dirname(path), os.path.basename(path))


def ensure_data(root: str, cfg: dict, log=print) -> dict:
    """The synthetic folder for `cfg` under `root` (reused when its stamp matches): {"data", "state",
    "seconds" (0 when reused), "bytes" per part}."""
    folder = os.path.join(root, f"n{cfg['n']}")
    stamp = os.path.join(folder, "bench_scale_data.json")
    if os.path.exists(stamp):
        with open(stamp) as handle:
            seen = json.load(handle)
        if {k: seen.get(k) for k in cfg} == cfg:
            return seen | {"reused": True}
        log(f"  {folder}: made with other settings; generating again")
    shutil.rmtree(folder, ignore_errors=True)
    data = os.path.join(folder, "data")
    rng = np.random.default_rng([cfg["seed"], cfg["n"]])
    seconds = {}
    t0 = time.perf_counter()
    shards = write_pool(os.path.join(data, "pool"), cfg["n"], seq_len=cfg["seq_len"], shard_bytes=cfg["shard_bytes"],
                        part_samples=cfg["part_samples"], rng=rng)
    seconds["pool"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_catalog(data, cfg["n"], shards, rng, part_samples=cfg["part_samples"])
    seconds["catalog"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _sets_and_marker(data, cfg, len(shards), rng)
    _probe_state(os.path.join(folder, "state.pt"))
    seconds["rest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_embedding_store(data, cfg["n"], cfg["embedding_part"], rng)
    seconds["embeddings"] = time.perf_counter() - t0
    sizes = {k: _du(os.path.join(data, k)) for k in ("pool", "catalog", "embeddings")}
    out = cfg | {"data": data, "state": os.path.join(folder, "state.pt"), "shards": len(shards),
                 "generate_seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
                 "bytes": sizes | {"total": _du(folder)}}
    with open(stamp, "w") as handle:
        json.dump(out, handle, indent=2)
    return out | {"reused": False}


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
