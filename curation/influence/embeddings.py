"""The embedding store: one pass of the frozen encoder over a pool, shared by every run and method.

    <data>/embeddings/<key>/embeddings.json      stamp: format, version, encoder settings, pool id
    <data>/embeddings/<key>/part-<first id>-<last id>-<sha1 of ids>.parquet   sample_id, embedding

`<key>` names the encoder, the layers kept, the max length and the float type
(`all-MiniLM-L6-v2-L2-len128-fp32`), so runs with other encoder settings get their own store.
An embedding is the encoder's masked mean-pooled last hidden state (`InfluenceModel.pooled`,
not normalised: Group-MATES' h is its L2-normalised form). The stamp also carries the sha1 of
the pool's `index.json`: a re-ingested pool has other texts behind the same ids, and a store
made for the old one is refused.

Parts are append-only. A pass computes only the ids no part holds yet, in parts of at most
`part_size` ids, each written atomically (schemas/storage.py); so a killed pass leaves whole parts
and the next one resumes without recomputing them, and a store can hold any subset of the pool
(only the candidates a run touches, say). Under the launcher each rank embeds the missing ids
of its `shard_for_rank` slice of the wanted ids. Two passes racing over the same ids write the same
values; a reader keeps one row per id.

Reads by need: a pool holds 10^8-10^9 samples and a boundary wants 10^5-10^8 of them, so nothing
reads the whole store. `load(ids)` lists the parts, keeps those whose id range (in the name)
overlaps the ids, reads them one at a time and keeps only the wanted rows, in the stored float
type (an fp16 store stays fp16 until the caller's matrix product). `ensure` finds the missing ids
among the wanted ones the same way, from the id column of the overlapping parts. DuckDB reads the
parts as they are:
`SELECT * FROM read_parquet('<data>/embeddings/<key>/part-*.parquet')`.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from curation.failpoints import failpoint
from schemas import tables
from schemas.errors import MatesError
from schemas.stamps import read_stamped_json
from schemas.storage import join, store_for

FORMAT = "mates-embeddings"
VERSION = 1
STAMP = "embeddings.json"
ENCODER = "all-MiniLM-L6-v2"
PART_SIZE = 2048
DTYPES = {"float32": "fp32", "float16": "fp16"}
ID = "sample_id"
PART_NAME = re.compile(r"part-(?P<first>\d+)-(?P<last>\d+)-[0-9a-f]{10}\.parquet")


def _positions(wanted: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each of `ids` would sit in the sorted `wanted`, whether it is there)."""
    pos = np.searchsorted(wanted, ids)
    hit = pos < len(wanted)
    hit[hit] = wanted[pos[hit]] == ids[hit]
    return pos, hit


@dataclass(frozen=True, kw_only=True)
class EmbeddingSettings:
    """What an embedding depends on: the encoder, its depth, its max length, the stored float type."""

    layers_kept: int
    max_len: int
    dtype: str = "float32"
    encoder: str = ENCODER

    def __post_init__(self):
        if not 1 <= int(self.layers_kept) <= 6:
            raise MatesError(f"`encoder_layers` must be in 1..6 (MiniLM-L6 has 6); got {self.layers_kept}.")
        if not 2 <= int(self.max_len) <= 512:
            raise MatesError(f"`encoder_max_len` must be in 2..512 (MiniLM positions); got {self.max_len}.")
        if self.dtype not in DTYPES:
            raise MatesError(f"`embeddings dtype` must be one of {', '.join(DTYPES)}; got {self.dtype!r}.")

    @classmethod
    def from_options(cls, options, dtype: str = "float32") -> "EmbeddingSettings":
        return cls(layers_kept=int(options.encoder_layers), max_len=int(options.encoder_max_len), dtype=dtype)

    @property
    def key(self) -> str:
        return f"{self.encoder}-L{self.layers_kept}-len{self.max_len}-{DTYPES[self.dtype]}"


def store_url(data_url: str, settings: EmbeddingSettings) -> str:
    return join(data_url, "embeddings", settings.key)


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc="embed", unit="sample", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


class EmbeddingStore:
    """The embeddings of one pool under one set of encoder settings (see the module docstring)."""

    def __init__(self, data_url: str, settings: EmbeddingSettings, *, part_size: int = PART_SIZE,
                 url: str | None = None):
        if int(part_size) < 1:
            raise MatesError(f"`part_size` must be >= 1; got {part_size}.")
        self.data_url, self.settings, self.part_size = data_url.rstrip("/"), settings, int(part_size)
        self.url = url.rstrip("/") if url else store_url(self.data_url, settings)   # `embeddings_url`, if set
        self.store = store_for(self.url)
        self._ranges: dict[str, tuple[int, int]] = {}           # part name -> [first, last] id
        self._part_ids: dict[str, np.ndarray] = {}              # part name -> its ids, once read
        self._encoder = None                                   # built on the first missing id

    # -- the stamp ------------------------------------------------------------------------
    def _pool_id(self) -> str:
        if getattr(self, "_pool_sha1", None) is None:  # read once per store object
            index = store_for(join(self.data_url, "pool")).read_bytes("index.json")
            self._pool_sha1 = hashlib.sha1(index).hexdigest()
        return self._pool_sha1

    def _expected(self, dim: int) -> dict:
        s = self.settings
        return {"format": FORMAT, "version": VERSION, "encoder": s.encoder, "layers_kept": s.layers_kept,
                "max_len": s.max_len, "dtype": s.dtype, "dim": int(dim), "pool_index_sha1": self._pool_id()}

    def stamp(self) -> dict | None:
        """The store's stamp, checked against these settings and this pool; None when there is none."""
        if not self.store.exists(STAMP):
            return None
        seen = read_stamped_json(self.store, STAMP, fmt=FORMAT, version=VERSION, what="embedding store")
        want = self._expected(seen.get("dim", 0))
        for key in ("encoder", "layers_kept", "max_len", "dtype", "pool_index_sha1"):
            if seen.get(key) != want[key]:
                raise MatesError(f"`{self.url}/{STAMP}` has {key}={seen.get(key)!r} but this pool and "
                                 f"encoder need {want[key]!r}; remove `{self.url}` (made for another "
                                 f"pool or settings) and embed again.")
        return seen

    # -- reading --------------------------------------------------------------------------
    def parts(self) -> list[str]:
        return [p for p in self.store.listdir() if p.startswith("part-") and p.endswith(".parquet")]

    def part_ranges(self) -> dict[str, tuple[int, int]]:
        """Each part's [first, last] sample id, from its name (`part-<first>-<last>-<sha1>`); a part
        named by its first id only (mates before the ranges) gives them from its footer's
        statistics, read once per store object. Only names are held, never the ids in the parts."""
        out = {}
        for name in self.parts():
            if name not in self._ranges:
                self._ranges[name] = self._range_of(name)
            out[name] = self._ranges[name]
        return out

    def _range_of(self, name: str) -> tuple[int, int]:
        import pyarrow.parquet as pq

        named = PART_NAME.fullmatch(name)
        if named:
            return int(named["first"]), int(named["last"])
        try:
            with self.store.open_read(name, block_size=1 << 16) as handle:
                meta = pq.read_metadata(handle)
            stats = [meta.row_group(g).column(0).statistics for g in range(meta.num_row_groups)]
            return min(int(s.min) for s in stats), max(int(s.max) for s in stats)
        except (pa.ArrowException, OSError, TypeError, AttributeError, ValueError) as exc:
            raise MatesError(f"`{self.url}/{name}` has no id range in its name nor readable id statistics "
                             f"({type(exc).__name__}); remove `{self.url}` and run `mates embed` again.") from exc

    def _overlapping(self, wanted: np.ndarray) -> list[str]:
        """The parts whose id range holds at least one of the sorted `wanted` ids."""
        out = []
        for name, (first, last) in sorted(self.part_ranges().items(), key=lambda kv: kv[1]):
            at = np.searchsorted(wanted, first)
            if at < len(wanted) and wanted[at] <= last:
                out.append(name)
        return out

    def _read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """One part (`columns` of it); a part deleted or damaged under this run stops it with one
        line. Parts are written atomically, so a damaged one was damaged from outside: it is
        removed, and the rerun recomputes its embeddings (a deleted one is simply missing on the
        rerun). A part is read whole (<= `part_size` rows, one GET) and parsed in memory, so a
        network error can never pass for damage."""
        import pyarrow.parquet as pq

        try:
            data = self.store.read_bytes(name)
        except MatesError as exc:
            raise MatesError(f"`{self.url}/{name}` was listed but could not be read ({exc}); was the store "
                             f"deleted under this run? Rerun: missing embeddings are recomputed.") from exc
        try:
            table = pq.read_table(io.BytesIO(data), columns=columns)
        except (pa.ArrowException, OSError) as exc:
            self.store.remove(name)
            raise MatesError(f"`{self.url}/{name}` is damaged ({len(data):,} bytes, {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}); removed it: rerun to recompute its "
                             f"embeddings.") from exc
        tables.check_version(table, tables.EMBEDDINGS, f"{self.url}/{name}")
        return table

    def _checked_stamp(self) -> dict | None:
        stamp = self.stamp()
        if stamp is None and self.parts():
            raise MatesError(f"`{self.url}` holds parts but no {STAMP}; remove it and embed again.")
        return stamp

    def _rows(self, name: str, stamp: dict, wanted: np.ndarray):
        """(positions in the sorted `wanted`, their embeddings [n, D] as stored) that part `name` holds."""
        table = self._read_part(name)
        want_type = tables.embeddings_schema(stamp["dim"], stamp["dtype"]).field("embedding").type
        if table.schema.field("embedding").type != want_type:
            raise MatesError(f"`{self.url}/{name}` holds {table.schema.field('embedding').type}; the "
                             f"store's stamp says {want_type}. Remove the part.")
        self._part_ids[name] = ids = np.asarray(table.column(ID), dtype=np.int64)
        pos, hit = _positions(wanted, ids)
        rows = table.column("embedding").take(pa.array(np.flatnonzero(hit))).combine_chunks()
        flat = rows.flatten().to_numpy(zero_copy_only=False)                    # [n * D], the store's dtype
        return pos[hit], flat.reshape(-1, stamp["dim"])

    def stored_ids(self, sample_ids: np.ndarray) -> np.ndarray:
        """The sorted unique `sample_ids` some part holds (only the id column of the parts whose
        range overlaps them is read)."""
        wanted = np.unique(np.asarray(sample_ids, dtype=np.int64))
        held = np.zeros(len(wanted), bool)
        if self._checked_stamp() is None:
            return wanted[held]
        for name in self._overlapping(wanted):
            pos, hit = _positions(wanted, self._ids_of(name))
            held[pos[hit]] = True
        return wanted[held]

    def overlapping_parts(self, sample_ids: np.ndarray) -> int:
        """How many parts a read of `sample_ids` opens (what `load` would read, in parts)."""
        return len(self._overlapping(np.unique(np.asarray(sample_ids, dtype=np.int64))))

    def _ids_of(self, name: str) -> np.ndarray:
        """Part `name`'s sample ids: its footer and id column alone (ranged reads, ~1% of a part),
        kept per store object; an unreadable part falls back to the whole read of `_read_part`
        (one GET, where a damaged part is told from a network error)."""
        import pyarrow.parquet as pq

        if name not in self._part_ids:
            try:
                with self.store.open_read(name, block_size=1 << 16) as handle:
                    ids = pq.read_table(handle, columns=[ID]).column(ID)
            except (pa.ArrowException, OSError):
                ids = self._read_part(name, [ID]).column(ID)
            self._part_ids[name] = np.asarray(ids, dtype=np.int64)
        return self._part_ids[name]

    def load(self, sample_ids: np.ndarray) -> np.ndarray:
        """Embeddings [N, D] of `sample_ids`, in order, in the store's float type: an fp16 store
        stays fp16 (half the bytes; callers upcast a chunk at a time at their matrix product).
        Every id must be stored. Only the parts whose id range overlaps the ids are read, one at a
        time, keeping only the wanted rows: memory is the result plus one part, whatever the pool."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        wanted, first, inverse = np.unique(sample_ids, return_index=True, return_inverse=True)
        stamp = self._checked_stamp()
        if stamp is None:
            self._refuse_missing(sample_ids, np.zeros(len(sample_ids), bool))
            return np.zeros((0, 0), np.float32)
        out = np.empty((len(sample_ids), stamp["dim"]), np.dtype(stamp["dtype"]))          # [N, D]
        found = np.zeros(len(wanted), bool)
        for name in self._overlapping(wanted):
            pos, rows = self._rows(name, stamp, wanted)
            out[first[pos]], found[pos] = rows, True     # a racing pass may repeat ids: same values
        self._refuse_missing(wanted, found)
        repeats = np.flatnonzero(first[inverse] != np.arange(len(sample_ids)))  # ids asked twice
        out[repeats] = out[first[inverse[repeats]]]
        return out

    def _refuse_missing(self, ids: np.ndarray, found: np.ndarray) -> None:
        if not np.all(found):
            raise MatesError(f"`{self.url}` lacks the embeddings of {int((~found).sum())} samples (e.g. "
                             f"sample_id {int(ids[~found][0])}); run `mates embed` or let curation "
                             f"compute them.")

    # -- writing --------------------------------------------------------------------------
    def _write_part(self, ids: np.ndarray, emb: np.ndarray) -> str:
        from schemas.storage import write_parquet

        schema = tables.embeddings_schema(emb.shape[1], self.settings.dtype)
        values = pa.array(emb.astype(np.dtype(self.settings.dtype)).ravel())
        column = pa.FixedSizeListArray.from_arrays(values, emb.shape[1]).cast(schema.field("embedding").type)
        table = pa.Table.from_arrays([pa.array(ids, pa.int64()), column], schema=schema)
        name = f"part-{int(ids[0]):09d}-{int(ids[-1]):09d}-{hashlib.sha1(ids.tobytes()).hexdigest()[:10]}.parquet"
        write_parquet(table, self.url, name)
        return name

    def ensure(self, sample_ids: np.ndarray, *, pool, pool_tokenizer, rank: int = 0, world_size: int = 1,
               batch_size: int = 64, device="cpu", progress: bool | None = None, encoder=None) -> dict:
        """Compute and store the embeddings of `sample_ids` that no part holds (this rank's share).

        `pool` is an open `MDSFolder`. `encoder` is an `InfluenceModel` whose (pretrained, never
        fitted) encoder to use; by default one is built from these settings when anything is missing.
        Returns {"computed", "reused", "parts_written", "seconds", "tokens"} for this rank; `seconds`
        counts computing new embeddings only (0 when every one was stored), not reading the store;
        `tokens` the encoder tokens of the new ones (the compute ledger).
        """
        from curation.influence.scoring import pool_texts, shard_for_rank

        wanted = np.unique(np.asarray(sample_ids, dtype=np.int64))
        self.stamp()  # refuse a store of another pool or other settings before any work
        # Split what is wanted, then drop what is stored: a rank's share never depends on how far
        # the others have got (splitting the missing ids would, and could leave ids to no rank).
        share = shard_for_rank(wanted, rank, world_size)
        mine = np.setdiff1d(share, self.stored_ids(share), assume_unique=True)
        stats = {"computed": 0, "reused": int(len(share) - len(mine)), "parts_written": 0, "seconds": 0.0,
                 "tokens": 0}
        if len(mine) == 0:
            return stats
        started = time.perf_counter()
        encoder = encoder or self._encoder
        if encoder is None:  # built once per store object: loading MiniLM costs seconds
            from curation.influence.finetuned import InfluenceModel

            encoder = InfluenceModel(layers_kept=self.settings.layers_kept, max_len=self.settings.max_len)
        self._encoder = encoder
        if (encoder.layers_kept, encoder.max_len) != (self.settings.layers_kept, self.settings.max_len):
            raise MatesError(f"`encoder` keeps {encoder.layers_kept} layers at max_len {encoder.max_len}; "
                             f"the store `{self.url}` is for {self.settings.layers_kept} at {self.settings.max_len}.")
        if not self.store.exists(STAMP):  # stamped before the first part: no part is ever unstamped
            self.store.write_bytes(json.dumps(self._expected(encoder.hidden_size), indent=2).encode(), STAMP)
        was_training = encoder.training
        encoder.to(device).eval()
        bar = _progress_bar(len(mine), progress)
        try:
            for start in range(0, len(mine), self.part_size):
                ids = mine[start:start + self.part_size]
                emb = pooled_embeddings(encoder, pool_texts(pool, ids, pool_tokenizer), batch_size=batch_size,
                                        device=device, on_batch=bar.update, counts=stats)
                self._write_part(ids, emb)
                stats["computed"] += len(ids)
                stats["parts_written"] += 1
                failpoint("embed")
        finally:
            bar.close()
            encoder.train(was_training)
        stats["seconds"] = time.perf_counter() - started
        return stats


@torch.inference_mode()
def pooled_embeddings(encoder, texts: list[str], *, batch_size: int = 64, device="cpu",
                      on_batch=lambda n: None, counts: dict | None = None) -> np.ndarray:
    """`encoder.pooled` of each text: [N, H] float32, in the order given (`counts["tokens"]`, if
    given, gets the encoder tokens read added).

    Texts are batched in order of their token count, so a batch pads to near its own length
    (padding is masked out of the mean, so the order changes the values only by float rounding).
    """
    ids = encoder.encode_texts(texts)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), encoder.hidden_size), np.float32)
    for start in range(0, len(order), int(batch_size)):
        rows = order[start:start + int(batch_size)]
        batch = {k: v.to(device) for k, v in encoder.collate([ids[i] for i in rows]).items()}
        if counts is not None:
            counts["tokens"] = counts.get("tokens", 0) + int(batch["attention_mask"].sum())
        out[rows] = encoder.pooled(**batch).float().cpu().numpy()                   # [b, H]
        on_batch(len(rows))
    return out
