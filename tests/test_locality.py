"""Locality (issue 22): a stage's candidates as whole shards (`stages.candidates`), a bounded local
cache of remote shards (`stages.cache_limit`), and a boundary that downloads about its
candidates' bytes: asserted on ids, bytes held and bytes fetched, not on time."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curation.select.candidates import MIN_SHARDS_PER_STAGE, candidate_pools, choose_mode
from curation.store import shard_cache
from curation.store.pool import MDSFolder, read_index
from schemas.errors import MatesError
from schemas.recipe import load_recipe
from schemas.storage import Store, join, store_for
from tests.conftest import MICRO_RECIPE, ingest_corpus


def _shard_of(ids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(sizes), ids, side="right")


def test_shards_mode_takes_whole_shards_disjoint_and_seeded():
    sizes = np.random.default_rng(3).integers(50, 150, size=300)   # ~30,000 samples
    pools = candidate_pools(sizes, count=3, per_stage=5000, seed=11, mode="shards")
    assert [len(p) for p in pools] == [5000] * 3
    assert len(np.unique(np.concatenate(pools))) == 15000          # disjoint
    for pool in pools:
        assert np.all(np.diff(pool) > 0)                              # sorted
        shards, taken = np.unique(_shard_of(pool, sizes), return_counts=True)
        partial = np.sum(taken != sizes[shards])
        assert partial <= 2, partial        # whole shards but at most one split at each end
        assert len(shards) >= 5000 / 150
    again = candidate_pools(sizes, count=3, per_stage=5000, seed=11, mode="shards")
    assert all(np.array_equal(a, b) for a, b in zip(pools, again))
    other = candidate_pools(sizes, count=3, per_stage=5000, seed=12, mode="shards")
    assert not np.array_equal(pools[0], other[0])
    with pytest.raises(MatesError, match="pool_per_stage"):
        candidate_pools(sizes, count=3, per_stage=11000, seed=11, mode="shards")


def test_auto_is_samples_on_a_small_pool_and_shards_with_enough_shards_per_stage():
    # one shard (the demo pool): samples, the very ids of the per-sample permutation
    old = np.random.default_rng([17, 104729]).permutation(5000)
    pools = candidate_pools([5000], count=3, per_stage=400, seed=17, mode="auto")
    assert all(np.array_equal(p, np.sort(old[k * 400:(k + 1) * 400])) for k, p in enumerate(pools))
    assert choose_mode([2500, 2500], count=3, per_stage=400, seed=17) == "samples"
    # 1,000 shards of 100: 64 whole shards per stage is the threshold, 63 falls back
    sizes = [100] * 1000
    assert MIN_SHARDS_PER_STAGE == 64
    assert choose_mode(sizes, count=3, per_stage=64 * 100, seed=17) == "shards"
    assert choose_mode(sizes, count=3, per_stage=63 * 100, seed=17) == "samples"
    auto = candidate_pools(sizes, count=3, per_stage=6400, seed=17, mode="auto")
    assert all(len(np.unique(p // 100)) == 64 for p in auto)


def test_bad_candidates_and_cache_limit_are_one_line_naming_the_key():
    with pytest.raises(MatesError) as err:
        load_recipe(MICRO_RECIPE, {"stages.candidates": "files"})
    assert "`stages.candidates`" in str(err.value) and "'shards'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MatesError, match="`stages.cache_limit` must be >= 0"):
        load_recipe(MICRO_RECIPE, {"stages.cache_limit": -1})
    with pytest.raises(MatesError, match="`stages.candidates` must be one of"):
        candidate_pools([100], count=1, per_stage=10, seed=1, mode="file")
    assert load_recipe(MICRO_RECIPE).stages.candidates == "auto"


@pytest.fixture(scope="module")
def sharded_pool(micro_corpus, tmp_path_factory, s3_server):
    """The micro corpus ingested with 64 KiB shards (8 shards of ~470 samples), locally and as a
    copy in its own bucket: (local data folder, s3 data URL)."""
    import boto3

    recipe = load_recipe(MICRO_RECIPE, {"ingest.shard_size_limit": 65536})
    local = str(tmp_path_factory.mktemp("sharded") / "data")
    ingest_corpus(micro_corpus, local, recipe)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-sharded")
    remote = store_for("s3://mates-sharded/data")
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            remote.put_file(path, os.path.relpath(path, local))
    return local, remote.url


@pytest.fixture
def fetches(monkeypatch):
    """A fresh process shard cache, and the (store path, bytes) of every `Store.get_file`."""
    monkeypatch.setattr(shard_cache, "_SHARED", {})
    seen, get_file = [], Store.get_file

    def counted(self, local_path, *parts):
        get_file(self, local_path, *parts)
        seen.append((self.path(*parts), os.path.getsize(local_path)))
    monkeypatch.setattr(Store, "get_file", counted)
    return seen


def _held_on_disk(cache) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache.root) for f in files)


def test_bounded_cache_holds_at_most_its_limit_and_reads_right(sharded_pool, fetches):
    local, remote = sharded_pool
    reference = MDSFolder(join(local, "pool"))
    shard_bytes = [s["raw_data"]["bytes"] for s in reference.index["shards"]]
    assert len(shard_bytes) >= 6
    limit = int(2.5 * max(shard_bytes))   # 2 shards fit, the 8 of the pool do not
    cache = shard_cache.ShardCache(limit)
    pool = MDSFolder(join(remote, "pool"), cache=cache)
    ids = np.random.default_rng(0).permutation(len(pool))[:400]   # every shard, in random order
    for i in ids:
        got, want = pool[int(i)], reference[int(i)]
        assert got["sample_id"] == want["sample_id"] == i and np.array_equal(got["tokens"], want["tokens"])
        assert cache.held_bytes == _held_on_disk(cache) <= limit
    assert cache.fetched_bytes == sum(n for _, n in fetches) > sum(shard_bytes)   # evicted and fetched again
    assert not reference.remote and shard_cache.shared_cache().fetched_bytes == 0   # local: read in place
    tiny = shard_cache.ShardCache(1000)    # below one shard: the shard being read is still held
    small = MDSFolder(join(remote, "pool"), cache=tiny)
    assert np.array_equal(small[5]["tokens"], reference[5]["tokens"])
    assert np.array_equal(small[len(small) - 1]["tokens"], reference[len(small) - 1]["tokens"])
    assert tiny.held_bytes == _held_on_disk(tiny) == shard_bytes[-1]
    tiny.release()
    assert tiny.held_bytes == _held_on_disk(tiny) == 0


def _boundary_fetches(remote: str, run: str, mode: str, fetches: list) -> tuple[set, set]:
    """Stage 0 (random) of a 3-stage micro run in `mode`: (pool shards fetched, candidates' shards)."""
    from training.stage_loop import RunContext, curate_if_needed

    recipe = load_recipe(MICRO_RECIPE, {"data": remote, "run": run, "stages.count": 3, "stages.batches": [30],
                                        "stages.candidates": mode})
    ctx = RunContext(recipe, log=lambda *_: None)
    assert ctx.candidate_mode == mode
    fetches.clear()
    curate_if_needed(ctx, 0)
    marker = json.loads(store_for(join(run, "stages", "0")).read_bytes("_SUCCESS"))
    assert marker["candidates_mode"] == mode                 # the draw, `auto` resolved, on record
    shards = read_index(join(remote, "pool"))[1]["shards"]
    sizes = np.array([s["samples"] for s in shards])
    wanted = {shards[k]["raw_data"]["basename"] for k in np.unique(_shard_of(ctx.pools[0], sizes))}
    fetched = [(path.split("/pool/", 1)[1], n) for path, n in fetches if "/pool/" in path]
    assert len(fetched) == len({p for p, _ in fetched})      # each shard once per boundary
    assert shard_cache.shared_cache().held_bytes == _held_on_disk(shard_cache.shared_cache()) == 0  # released
    return {p for p, _ in fetched}, wanted


def test_a_shards_boundary_downloads_only_its_candidates_shards(sharded_pool, fetches, bucket):
    _, remote = sharded_pool
    fetched, wanted = _boundary_fetches(remote, join(bucket, "shards"), "shards", fetches)
    assert fetched <= wanted and len(wanted) <= 2     # 400 candidates: within 2 shards of ~470
    everything, _ = _boundary_fetches(remote, join(bucket, "samples"), "samples", fetches)
    n_shards = len(json.loads(store_for(join(remote, "pool")).read_bytes("index.json"))["shards"])
    assert len(everything) == n_shards                # the per-sample draw touches every shard


def test_audit_column_check_reads_the_catalog_footer_only(tmp_path, monkeypatch):
    """`stages.audit_by` is checked from the catalog's last 64 KiB, not the whole object; a size
    lookup that reads 0 bytes (as under store faults) is retried."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.stage_loop import check_audit_column

    rng = np.random.default_rng(0)
    n = 5000
    table = pa.table({"sample_id": np.arange(n), "source": ["wiki"] * n,
                      "preview": [rng.bytes(60).hex() for _ in range(n)]})   # ~600 KB, most of it previews
    os.makedirs(tmp_path / "catalog")
    path = tmp_path / "catalog" / "samples.parquet"
    pq.write_table(table, path, row_group_size=500)
    reads, sizes = [], iter([0])       # the first size lookup fails as 0 bytes
    read_range, size = Store.read_range, Store.size
    monkeypatch.setattr(Store, "read_bytes", lambda self, *parts: pytest.fail(f"whole read of {parts}"))
    monkeypatch.setattr(Store, "size", lambda self, *parts: next(sizes, None) or size(self, *parts))
    monkeypatch.setattr(Store, "read_range", lambda self, *parts, start, end:
                        reads.append(end - start) or read_range(self, *parts, start=start, end=end))
    check_audit_column(str(tmp_path), "source")
    assert 0 < sum(reads) <= 64 << 10 and os.path.getsize(path) > 8 * sum(reads)
    with pytest.raises(MatesError, match=r"`stages.audit_by` must be a catalog column \(sample_id, source, preview\)"):
        check_audit_column(str(tmp_path), "topic")


def _index_samples(run: str, bucket: str) -> list[tuple[int, bytes]]:
    index = MDSFolder(join(run, "stages", "1", "index", bucket))
    return [(int(s["sample_id"]), s["tokens"].tobytes()) for s in index.iter_items(np.arange(len(index)))]


def test_index_of_many_buckets_downloads_each_shard_once_when_they_outgrow_the_cache(sharded_pool, fetches,
                                                                                   tmp_path):
    """Four buckets spread over 4 shards, a cache of 1.5 shards: without the one-pass copy each
    bucket would fetch every shard again (16 downloads); the index is the one the local pool gives."""
    import pyarrow as pa

    from curation.store.stage_index import write_stage_index

    local, remote = sharded_pool
    ids = np.arange(0, 4 * 460, 7)                       # the first 4 shards (~470 samples each)
    selection = pa.table({"sample_id": ids, "bucket": [f"b{i % 4:03d}" for i in range(len(ids))],
                          "weight": np.full(len(ids), 0.25), "selected": np.ones(len(ids), bool)})
    shard_cache.set_limit(int(1.5 * 65536))
    write_stage_index(selection, pool_url=join(remote, "pool"), run_url=str(tmp_path / "s3"), stage=1, method="t")
    pool_fetches = [p for p, _ in fetches if "/pool/" in p]
    assert len(pool_fetches) == len(set(pool_fetches)) == 4
    write_stage_index(selection, pool_url=join(local, "pool"), run_url=str(tmp_path / "local"), stage=1, method="t")
    for k in range(4):
        got = _index_samples(str(tmp_path / "s3"), f"b{k:03d}")
        assert [i for i, _ in got] == ids[k::4].tolist()
        assert got == _index_samples(str(tmp_path / "local"), f"b{k:03d}")


def test_a_run_begun_before_the_key_resumes_drawing_per_sample(tmp_path):
    """A run whose saved recipe.yaml predates `stages.candidates` keeps its per-sample draw on
    resume: `auto` must not switch its later stages to shards."""
    import yaml

    from schemas.recipe import dump_recipe
    from training.stage_loop import _resumed_mode

    recipe = load_recipe(MICRO_RECIPE, {"run": str(tmp_path), "stages.candidates": "shards"})
    assert _resumed_mode(recipe) == "shards"                    # a new run
    saved = yaml.safe_load(dump_recipe(recipe))
    store_for(str(tmp_path)).write_bytes(yaml.safe_dump(saved).encode(), "recipe.yaml")
    assert _resumed_mode(recipe) == "shards"                    # begun with the key
    del saved["stages"]["candidates"], saved["stages"]["cache_limit"]
    store_for(str(tmp_path)).write_bytes(yaml.safe_dump(saved).encode(), "recipe.yaml")
    assert _resumed_mode(recipe) == "samples"                   # begun before it
