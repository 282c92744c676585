"""Group-MATES selection that scales: clusters from a target size, a k-means tree that keeps fp16
rows fp16, the greedy in torch on a given device."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from curation.select import kmeans
from curation.select.clustering import BRANCH, cluster_embeddings, n_clusters_for
from curation.select.kmeans import spherical_kmeans
from curation.select.greedy import greedy_group_select, select_per_cluster
from tests.test_group_select import _brute_force_greedy, _one_torch_thread  # noqa: F401 (autouse here too)


def _topics(n_topics: int, per: int, dim: int = 32, seed: int = 0):
    """Unit rows around `n_topics` random centres (cos(h, centre) ~ 0.9), fp32, and their topic."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_topics, dim, generator=gen), dim=1)
    topic = torch.arange(n_topics).repeat_interleave(per)
    noise = 0.5 * torch.randn(len(topic), dim, generator=gen) / dim ** 0.5
    return torch.nn.functional.normalize(centres[topic] + noise, dim=1), topic


def test_cluster_count_follows_cluster_size_unless_given():
    assert n_clusters_for(1_000_000, 2000) == 500
    assert n_clusters_for(5_000_000, 2000) == 2500
    assert n_clusters_for(999, 2000) == 1 and n_clusters_for(3000, 2000) == 2   # rounded, >= 1
    assert n_clusters_for(1_000_000, 2000, n_clusters=8) == 8                     # given: it wins
    assert n_clusters_for(5, 2000, n_clusters=8) == 5                             # never above N


def test_recipe_keys_for_clusters():
    from schemas.recipe import recipe_from_dict
    from schemas.errors import MatesError

    base = {"data": "/tmp/d", "run": "/tmp/r", "stages": {"method": "group_mates"}}
    opts = recipe_from_dict(base).method_options
    assert (opts.cluster_size, opts.n_clusters) == (2000, None)
    for key, value in (("cluster_size", 0), ("n_clusters", 0)):
        with pytest.raises(MatesError, match=f"`stages.options.{key}` must be >= 1"):
            recipe_from_dict({**base, "stages": {"method": "group_mates", "options": {key: value}}})


def test_fp16_rows_are_never_copied_to_fp32():
    x, _ = _topics(4, 50)
    half = x.half()
    assert kmeans.unit_rows(half, 64) is half                 # unit rows: used as they are
    scaled = kmeans.unit_rows(half * 3, 64)                   # not unit: a 16-bit copy
    assert scaled.dtype == torch.float16
    assert torch.allclose(scaled.float().norm(dim=1), torch.ones(200), atol=2e-3)


def test_tree_kmeans_over_many_clusters_is_close_to_flat():
    """k > BRANCH: two levels; every leaf used; within 0.03 of flat k-means' mean cosine and the
    planted topics recovered as well (fp16 input)."""
    k = 80
    x, topic = _topics(k, 60)
    stats = {}
    labels = cluster_embeddings(x.half(), k, seed=3, stats=stats).long()
    assert stats["levels"] == 2 and k > BRANCH and stats["kmeans_runs"] >= 2
    assert labels.dtype == torch.long and int(labels.min()) == 0 and int(labels.max()) == k - 1
    assert len(torch.unique(labels)) == k

    def mean_cos(lab):
        c = torch.nn.functional.normalize(torch.zeros(k, x.shape[1]).index_add_(0, lab, x), dim=1)
        return float((x * c[lab]).sum(1).mean())

    flat = spherical_kmeans(x, k, seed=3)[0].long()
    # leaves are dealt to groups by rows, not by topics, and a row never leaves its top group:
    # on these planted topics the tree sits 0.02-0.03 below flat (k = 70-100, two data seeds)
    assert mean_cos(labels) >= mean_cos(flat) - 0.03
    purity = sum(int(torch.bincount(topic[labels == c]).max()) for c in range(k)) / len(topic)
    assert purity >= 0.9
    assert torch.equal(labels, cluster_embeddings(x.half(), k, seed=3).long())  # deterministic
    small = cluster_embeddings(x, 6, seed=3).long()     # <= BRANCH: flat k-means itself
    assert torch.equal(small, spherical_kmeans(x, 6, seed=3)[0].long())


def test_tree_top_assigns_once_and_leaves_cap_their_full_passes(monkeypatch):
    """The top level is fitted on a sample and assigns every row in one pass; a leaf big enough for
    its warm sample runs at most LEAF_FULL_PASSES passes over all its rows (the tree's cost then
    grows ~sqrt(k) per row, not with the leaves' passes), and still clusters close to flat."""
    from curation.select import clustering

    k = 80
    x, topic = _topics(k, 700)
    calls = []

    def recorded(rows, kk, **kw):
        st = {}
        out = spherical_kmeans(rows, kk, **{**kw, "stats": st})
        calls.append((rows.shape[0], kk, kw, st))
        return out

    monkeypatch.setattr(clustering, "spherical_kmeans", recorded)
    labels = cluster_embeddings(x, k, seed=1).long()
    top, leaves = calls[0], calls[1:]
    assert top[1] == clustering._top_width(k, 2) == 29 and top[3]["iterations"] == clustering.UPPER_PASSES
    assert top[3]["warm_rows"] > 0                                   # fitted on a sample
    capped = [c for c in leaves if c[0] >= 4 * clustering.LEAF_WARM_PER_CLUSTER * c[1]]
    assert len(capped) >= len(leaves) // 2                           # most groups here are big enough
    for rows, kk, kw, st in capped:
        assert st["warm_rows"] == clustering.LEAF_WARM_PER_CLUSTER * kk
        assert 1 <= st["iterations"] <= clustering.LEAF_FULL_PASSES
    flat = spherical_kmeans(x, k, seed=1)[0].long()

    def mean_cos(lab):
        c = torch.nn.functional.normalize(torch.zeros(k, x.shape[1]).index_add_(0, lab, x), dim=1)
        return float((x * c[lab]).sum(1).mean())

    assert mean_cos(labels) >= mean_cos(flat) - 0.03


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.7, 2.0)])
def test_torch_greedy_equals_brute_force_from_fp16_rows(alpha, beta):
    rng = np.random.default_rng(5)
    emb = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(40, 8))), dim=1).half()
    s = rng.normal(size=40)
    picks = greedy_group_select(s, emb, 12, alpha=alpha, beta=beta, block=4, device="cpu")
    expected = _brute_force_greedy(s, emb.double().numpy(), 12, alpha, beta)
    assert picks.tolist() == list(expected)


def test_select_per_cluster_on_a_device_matches_block_one():
    x, topic = _topics(5, 80, dim=16)
    s = np.random.default_rng(0).normal(size=len(topic))
    quotas = {0: 10, 1: 0, 2: 30, 3: 5, 4: 80}
    a = select_per_cluster(s, x.half(), topic.numpy(), quotas, device="cpu")
    b = select_per_cluster(s, x.half().float(), topic.numpy(), quotas, block=1, device="cpu")
    assert np.array_equal(a, b) and int(a.sum()) == 125
    assert [int(a[topic.numpy() == c].sum()) for c in range(5)] == [10, 0, 30, 5, 80]


def test_group_mates_select_uses_cluster_size(local_pool):
    """The method's k is candidates / cluster_size when `n_clusters` is null."""
    from curation.methods.base import StageContext
    from curation.methods.group_mates_method import GroupMatesMethod
    from schemas.method_options import GroupMatesOptions
    from curation.store.catalog import read_catalog

    ids = np.asarray(read_catalog(local_pool, []).column("sample_id"))[:300]
    x, _ = _topics(6, 50, dim=16)
    method = GroupMatesMethod()
    method.embeddings, method.alpha, method.beta = x.half(), 1.0, 1.0
    ctx = StageContext(run_url="/unused", data_url=local_pool, stage=1, candidates=ids, n_select=60, seed=0,
                       options=GroupMatesOptions(cluster_size=50, dedup=False), log=lambda m: None)
    table = method.select(ctx, np.random.default_rng(0).normal(size=300))
    assert len(np.unique(method.clusters)) == 6
    assert isinstance(table, pa.Table) and int(np.asarray(table.column("selected")).sum()) == 60
    ctx.options = GroupMatesOptions(cluster_size=50, n_clusters=2, dedup=False)
    method.select(ctx, np.random.default_rng(0).normal(size=300))
    assert len(np.unique(method.clusters)) == 2
