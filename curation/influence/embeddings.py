"""The embedding store: one pass of the frozen encoder over a pool, shared by every run and method.

    <data>/embeddings/<key>/embeddings.json      stamp: format, version, encoder settings, pool id
    <data>/embeddings/<key>/part-<first id>-<sha1 of ids>.parquet   sample_id, embedding

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
values; a reader keeps one row per id. DuckDB reads the parts as they are:
`SELECT * FROM read_parquet('<data>/embeddings/<key>/part-*.parquet')`.
"""
from __future__ import annotations

import hashlib
import io
import json
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

    def __init__(self, data_url: str, settings: EmbeddingSettings, *, part_size: int = PART_SIZE):
        if int(part_size) < 1:
            raise MatesError(f"`part_size` must be >= 1; got {part_size}.")
        self.data_url, self.settings, self.part_size = data_url.rstrip("/"), settings, int(part_size)
        self.url = store_url(self.data_url, settings)
        self.store = store_for(self.url)
        self._ids = np.zeros(0, np.int64)                      # [M] sorted, unique
        self._emb = np.zeros((0, 0), np.float32)               # [M, D]
        self._parts_read: set[str] = set()
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

    def _refresh(self) -> None:
        """Read the parts not read yet into the in-memory (ids, embeddings), one row per id."""
        new = [p for p in self.parts() if p not in self._parts_read]
        if not new:
            return
        stamp = self.stamp()
        if stamp is None:
            raise MatesError(f"`{self.url}` holds parts but no {STAMP}; remove it and embed again.")
        schema = tables.embeddings_schema(stamp["dim"], stamp["dtype"])
        ids, embs = [self._ids], [self._emb.reshape(-1, stamp["dim"])]
        for name in new:
            table = self._read_part(name)
            tables.check_version(table, schema, f"{self.url}/{name}")
            if table.schema.field("embedding").type != schema.field("embedding").type:
                raise MatesError(f"`{self.url}/{name}` holds {table.schema.field('embedding').type}; the "
                                 f"store's stamp says {schema.field('embedding').type}. Remove the part.")
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            ids.append(np.asarray(table.column("sample_id"), dtype=np.int64))
            embs.append(flat.astype(np.float32).reshape(-1, stamp["dim"]))
            self._parts_read.add(name)
        all_ids = np.concatenate(ids)
        keep_ids, first = np.unique(all_ids, return_index=True)   # a racing pass may repeat ids
        self._ids, self._emb = keep_ids, np.concatenate(embs)[first]

    def _read_part(self, name: str):
        """One part; a part deleted or damaged under this run stops it with one line. Parts are
        written atomically, so a damaged one was damaged from outside: it is removed, and the
        rerun recomputes its embeddings (a deleted one is simply missing on the rerun)."""
        import pyarrow.parquet as pq

        try:
            data = self.store.read_bytes(name)
        except MatesError as exc:
            raise MatesError(f"`{self.url}/{name}` was listed but could not be read ({exc}); was the store "
                             f"deleted under this run? Rerun: missing embeddings are recomputed.") from exc
        try:
            return pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            self.store.remove(name)
            raise MatesError(f"`{self.url}/{name}` is damaged ({len(data):,} bytes, {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}); removed it: rerun to recompute its "
                             f"embeddings.") from exc

    def _merge(self, ids: np.ndarray, emb: np.ndarray) -> None:
        """Add rows this process wrote (as stored: rounded to the store's dtype) to the cache."""
        all_ids = np.concatenate([self._ids, ids])
        keep_ids, first = np.unique(all_ids, return_index=True)
        self._ids, self._emb = keep_ids, np.concatenate([self._emb.reshape(-1, emb.shape[1]), emb])[first]

    def stored_ids(self) -> np.ndarray:
        self._refresh()
        return self._ids.copy()

    def load(self, sample_ids: np.ndarray) -> np.ndarray:
        """Embeddings [N, D] float32 of `sample_ids`, in order; every id must be stored."""
        self._refresh()
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        pos = np.searchsorted(self._ids, sample_ids)
        found = (pos < len(self._ids)) & (self._ids[np.minimum(pos, max(len(self._ids) - 1, 0))] == sample_ids) \
            if len(self._ids) else np.zeros(len(sample_ids), bool)
        if not np.all(found):
            raise MatesError(f"`{self.url}` lacks the embeddings of {int((~found).sum())} samples (e.g. "
                             f"sample_id {int(sample_ids[~found][0])}); run `mates embed` or let curation "
                             f"compute them.")
        return self._emb[pos]

    # -- writing --------------------------------------------------------------------------
    def _write_part(self, ids: np.ndarray, emb: np.ndarray) -> str:
        from schemas.storage import write_parquet

        schema = tables.embeddings_schema(emb.shape[1], self.settings.dtype)
        values = pa.array(emb.astype(np.dtype(self.settings.dtype)).ravel())
        column = pa.FixedSizeListArray.from_arrays(values, emb.shape[1]).cast(schema.field("embedding").type)
        table = pa.Table.from_arrays([pa.array(ids, pa.int64()), column], schema=schema)
        name = f"part-{int(ids[0]):09d}-{hashlib.sha1(ids.tobytes()).hexdigest()[:10]}.parquet"
        write_parquet(table, self.url, name)
        self._parts_read.add(name)  # its rows go to the cache directly (`_merge`)
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
        mine = np.setdiff1d(share, self.stored_ids(), assume_unique=True)
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
                self._merge(ids, emb.astype(np.dtype(self.settings.dtype)).astype(np.float32))
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
