"""`mates embed`: one pass of the frozen encoder over a pool (or the candidates a recipe touches),
ahead of any run, into the pool's shared embedding store (curation/influence/embeddings.py).

Resumable (finished parts are kept) and data-parallel under the launcher
(`composer -n 2 -m jobs.cli embed ...`: each rank embeds its slice of the missing ids).
"""
from __future__ import annotations

import numpy as np

from schemas.errors import MatesError
from schemas.method_options import METHOD_OPTIONS


def encoder_options(recipe, method: str | None):
    """The options block whose encoder settings to embed with: `method`'s, else the recipe's
    method's when it has an encoder, else mates'."""
    import dataclasses

    from schemas.recipe import options_for

    name = method or (recipe.stages.method if hasattr(recipe.method_options, "encoder_layers") else "mates")
    if name not in METHOD_OPTIONS or "encoder_layers" not in {f.name for f in dataclasses.fields(METHOD_OPTIONS[name])}:
        raise MatesError(f"`--method` must be a method with an encoder (mates, group_mates); got {name!r}.")
    return options_for(recipe.stages, name)


def ids_to_embed(recipe, shard_samples: list[int], *, touched: bool = False,
                 limit: int | None = None) -> np.ndarray:
    """Every sample id, or (`touched`) the candidates of the recipe's curated stages (k >= 1: what
    a run of it embeds, `stages.candidates` as the run picks it); the first `limit` of them if given.
    `shard_samples`: the pool's samples per shard (its index.json)."""
    from curation.select.candidates import candidate_pools

    if touched:
        st = recipe.stages
        pools = candidate_pools(shard_samples, count=st.count, per_stage=st.pool_per_stage, seed=recipe.seed,
                                mode=st.candidates)
        ids = np.sort(np.concatenate(pools[1:] or [np.zeros(0, np.int64)]))
    else:
        ids = np.arange(sum(shard_samples), dtype=np.int64)
    if limit is not None:
        if limit < 1:
            raise MatesError(f"`--limit` must be >= 1; got {limit}.")
        ids = ids[:limit]
    return ids


def embed_pool(recipe, *, method: str | None = None, touched: bool = False, limit: int | None = None,
               part_size: int | None = None, log=print) -> dict:
    """Embed the pool of `recipe.data` (all of it, the curated stages' candidates, or the first
    `limit` ids); returns this rank's stats and the store URL."""
    from curation.compute import encoder_flops
    from curation.data.ingest import read_pool_marker
    from curation.methods.ledger import encoder_shape
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence.embeddings import PART_SIZE, EmbeddingSettings, EmbeddingStore
    from curation.store import shard_cache
    from curation.store.pool import MDSFolder, shard_samples
    from schemas.storage import join
    from training import dist_utils

    dist_utils.init(recipe.device, timeout_s=recipe.dist_timeout_s)
    opts = encoder_options(recipe, method)
    read_pool_marker(recipe.data)   # a folder without an ingested pool is one line
    ids = ids_to_embed(recipe, shard_samples(join(recipe.data, "pool")), touched=touched, limit=limit)
    shard_cache.set_limit(recipe.stages.cache_limit)
    settings = EmbeddingSettings.from_options(opts, dtype=opts.embedding_dtype)
    store = EmbeddingStore(recipe.data, settings, part_size=part_size or PART_SIZE, url=opts.embeddings_url)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if rank == 0:
        log(f"embed: {len(ids)} samples of {recipe.data} into {store.url} ({world} rank(s))")
    stats = store.ensure(ids, pool=MDSFolder(join(recipe.data, "pool")), pool_tokenizer=load_pool_tokenizer(recipe.data),
                         rank=rank, world_size=world, batch_size=opts.batch_size * 4,
                         device=dist_utils.device_name(recipe.device), progress=None if rank == 0 else False)
    dist_utils.barrier()
    rate = stats["computed"] / stats["seconds"] if stats["seconds"] else 0.0
    # the compute ledger (README "Compute ledger"): one encoder forward of every new token
    stats["flops"] = encoder_flops(encoder_shape(store._encoder), fitted_tokens=0, scored_tokens=stats["tokens"]) \
        if stats["computed"] else 0.0
    log(f"embed (rank {rank}): {stats['computed']} computed in {stats['seconds']:.1f} s ({rate:.0f} samples/s), "
        f"{stats['reused']} already stored, {stats['parts_written']} parts written; "
        f"{stats['tokens']} encoder tokens, {stats['flops']:.3g} FLOPs")
    return {**stats, "store": store.url, "samples": int(len(ids)), "rank": rank}
