"""Group-MATES selection (DESIGN.md 2.4): relational greedy, spherical k-means, DuckDB metadata."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from curation.select import metadata
from curation.select.kmeans import init_centroids, spherical_kmeans
from curation.select.greedy import global_greedy, greedy_group_select, select_per_cluster
from schemas import tables
from schemas.errors import MatesError
from schemas.storage import join, write_parquet


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP start-up costs more than it gains (and 10x more on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit(rng, n, d):
    e = rng.normal(size=(n, d))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _brute_force_greedy(s, emb, quota, alpha, beta):
    """The greedy of DESIGN.md 2.4 written out: every marginal recomputed from scratch."""
    picks = []
    for t in range(1, quota + 1):
        best, best_j = None, None
        for j in range(len(s)):
            if j in picks:
                continue
            if t == 1:
                theta = s[j] * alpha
            else:
                total = sum(float(np.dot(emb[i], emb[j])) for i in picks)
                theta = s[j] * alpha * (1 - total / (beta * (t - 1)))
            if best is None or theta < best:
                best, best_j = theta, j
        picks.append(best_j)
    return picks


# ---------------------------------------------------------------- relational greedy
def test_orthogonal_embeddings_reduce_to_sorting_by_score():
    rng = np.random.default_rng(0)
    s = rng.normal(size=16)
    emb = np.eye(16)                           # every h_i . h_j = 0: θ_t = α s(x_t)
    picks = greedy_group_select(s, emb, 10, alpha=1.3, beta=0.7)
    assert picks.tolist() == np.argsort(s)[:10].tolist()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha,beta", [(1.7, 0.6), (0.8, 2.5), (-0.9, 1.3)])
def test_greedy_equals_brute_force(seed, alpha, beta):
    rng = np.random.default_rng(seed)
    s, emb = rng.normal(size=30), _unit(rng, 30, 8)
    expected = _brute_force_greedy(s, emb, 12, alpha, beta)
    for block in (1, 5, 64):                   # speculative GEMM blocks change no pick
        assert greedy_group_select(s, emb, 12, alpha=alpha, beta=beta, block=block).tolist() == expected
    as_torch = greedy_group_select(torch.from_numpy(s), torch.from_numpy(emb).float(), 12, alpha=alpha, beta=beta)
    assert as_torch.tolist() == expected


def test_greedy_bounds_and_bad_input():
    rng = np.random.default_rng(1)
    s, emb = rng.normal(size=5), _unit(rng, 5, 3)
    assert greedy_group_select(s, emb, 0).tolist() == []
    assert sorted(greedy_group_select(s, emb, 5).tolist()) == list(range(5))
    with pytest.raises(MatesError, match="quota"):
        greedy_group_select(s, emb, 6)
    with pytest.raises(MatesError, match="beta"):
        greedy_group_select(s, emb, 2, beta=0.0)
    with pytest.raises(MatesError, match="same rows"):
        greedy_group_select(s, emb[:4], 2)


def test_select_per_cluster_is_the_greedy_inside_each_cluster():
    rng = np.random.default_rng(2)
    n = 120
    s, emb = rng.normal(size=n), _unit(rng, n, 6)
    labels = rng.integers(0, 3, n)
    labels[:7] = -1                            # dropped rows (e.g. duplicates): never selected
    quotas = {0: 5, 1: 0, 2: 9}
    mask = select_per_cluster(s, emb, labels, quotas, alpha=1.2, beta=0.8)
    assert not mask[:7].any()
    for c, q in quotas.items():
        rows = np.flatnonzero(labels == c)
        assert mask[rows].sum() == q
        picks = greedy_group_select(s[rows], emb[rows], q, alpha=1.2, beta=0.8)
        assert set(rows[picks]) == set(np.flatnonzero(mask & (labels == c)))
    # one cluster holding everything is the global greedy
    assert (select_per_cluster(s, emb, np.zeros(n), {0: 30}) == global_greedy(s, emb, 30)).all()
    with pytest.raises(MatesError, match="quotas"):
        select_per_cluster(s, emb, labels, {0: 10_000})


def test_interaction_off_is_each_clusters_quota_of_least_score():
    """`interaction: false` (the relational term's ablation): the greedy with β -> inf, i.e. each
    cluster's quota of least α s; with the term on, near-duplicate rows are no longer all picked."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=60)
    emb = _unit(rng, 60, 5)
    emb[1:4] = emb[0]                          # four copies of one direction, all with the least scores
    s[:4] = s.min() - np.arange(1, 5)
    labels = np.zeros(60, dtype=int)
    off = select_per_cluster(s, emb, labels, {0: 6}, alpha=1.0, beta=0.5, interaction=False)
    assert set(np.flatnonzero(off)) == set(np.argsort(s)[:6])
    assert (off == select_per_cluster(s, emb, labels, {0: 6}, alpha=1.0, beta=1e12)).all()   # β -> inf
    on = select_per_cluster(s, emb, labels, {0: 6}, alpha=1.0, beta=0.5)
    assert on[:4].sum() < 4                    # the term spreads the picks away from the copies
    flipped = select_per_cluster(s, emb, labels, {0: 6}, alpha=-1.0, interaction=False)   # α < 0: greatest s
    assert set(np.flatnonzero(flipped)) == set(np.argsort(-s)[:6])


# ---------------------------------------------------------------- spherical k-means
def _planted(seed, n_per, k, dim, noise):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1)
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centres[truth] + noise * torch.randn(len(truth), dim, generator=gen) / dim ** 0.5
    perm = torch.randperm(len(truth), generator=gen)
    return x[perm], truth[perm]                # not normalised: spherical_kmeans does it


def test_kmeans_recovers_planted_clusters_and_is_deterministic():
    x, truth = _planted(0, n_per=200, k=6, dim=32, noise=0.3)
    labels, centroids = spherical_kmeans(x, 6, seed=3)
    assert labels.dtype == torch.int32 and labels.shape == (1200,) and centroids.shape == (6, 32)
    mapping = {int(t): set(labels[truth == t].tolist()) for t in range(6)}
    assert all(len(found) == 1 for found in mapping.values())             # each planted -> one label
    assert len(set.union(*mapping.values())) == 6                         # and labels are distinct
    again, centroids_again = spherical_kmeans(x, 6, seed=3)
    assert torch.equal(labels, again) and torch.equal(centroids, centroids_again)
    # centroids are the normalised means of the labels returned
    xn = torch.nn.functional.normalize(x, dim=1)
    means = torch.nn.functional.normalize(torch.zeros(6, 32).index_add_(0, labels.long(), xn), dim=1)
    torch.testing.assert_close(centroids, means, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("n_per,k,dim,noise", [(250, 20, 16, 1.0), (400, 7, 8, 3.0), (300, 12, 24, 2.0)])
def test_pruned_kmeans_equals_plain_lloyd(n_per, k, dim, noise, prune):
    """The distance bounds only skip work, and the [k, c] passes only reorder a product: labels
    of both equal textbook Lloyd from the same start."""
    x, _ = _planted(k, n_per, k, dim, noise)
    x = torch.nn.functional.normalize(x, dim=1)
    stats = {}
    labels, _ = spherical_kmeans(x, k, seed=1, max_iter=40, warm_rows=0, stats=stats, prune=prune)
    centroids, plain = init_centroids(x, k, seed=1), None
    for _ in range(40):
        new = (x @ centroids.T).argmax(dim=1)
        if plain is not None and torch.equal(new, plain):
            break
        plain = new
        centroids = torch.nn.functional.normalize(torch.zeros(k, dim).index_add_(0, plain, x), dim=1)
    assert torch.equal(labels.long(), plain)
    full = sum(stats["full_rows"][1:]) < (len(stats["full_rows"]) - 1) * len(x)
    assert full == prune                                     # pruned: something was skipped; plain: nothing


def test_kmeans_warm_start_tol_and_bad_input():
    x, truth = _planted(1, n_per=300, k=5, dim=16, noise=0.3)
    stats = {}
    labels, _ = spherical_kmeans(x, 5, seed=0, warm_rows=320, stats=stats)
    assert stats["warm_rows"] == 320 and stats["changed_last"] == 0
    assert all(len(set(labels[truth == t].tolist())) == 1 for t in range(5))
    assert spherical_kmeans(x, 1, seed=0)[0].unique().tolist() == [0]
    with pytest.raises(MatesError, match="`k`"):
        spherical_kmeans(x, 2000, seed=0)
    with pytest.raises(MatesError, match="`emb`"):
        spherical_kmeans(torch.zeros(0, 4), 1, seed=0)


# ---------------------------------------------------------------- DuckDB metadata
def _scores(rng, sizes, means):
    cluster = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    pred = (np.repeat(means, sizes) + 0.1 * rng.normal(size=cluster.size)).astype(np.float32)
    return pa.table({"sample_id": np.arange(cluster.size, dtype=np.int64) + 1000, "prediction": pred,
                     "cluster": cluster})


def _water_fill(sizes, weights, budget):
    """Reference: proportional shares, full clusters capped, excess redistributed, until stable."""
    sizes, weights = np.asarray(sizes, float), np.asarray(weights, float)
    exact, open_ = np.zeros(len(sizes)), np.ones(len(sizes), bool)
    while open_.any():
        left = budget - exact[~open_].sum()
        share = left * weights / weights[open_].sum()
        over = open_ & (share >= sizes)
        if not over.any():
            exact[open_] = share[open_]
            return exact
        exact[over], open_ = sizes[over], open_ & ~over
    return exact


@pytest.mark.parametrize("mode", ["size", "influence"])
def test_quotas_sum_to_budget_within_sizes(mode):
    rng = np.random.default_rng(3)
    sizes = [5, 400, 37, 1200, 90, 3, 650, 18]
    means = rng.normal(size=len(sizes))
    table = _scores(rng, sizes, means)
    con = metadata.connect()
    for budget in (0, 1, 97, 500, 1777, sum(sizes) - 1, sum(sizes)):
        for temperature in (0.05, 0.5, 5.0):
            q = metadata.cluster_quotas(con, table, budget, mode, temperature)
            quota, size = np.asarray(q["quota"]), np.asarray(q["size"])
            assert quota.sum() == budget and (quota >= 0).all() and (quota <= size).all()
            assert (np.abs(quota - np.asarray(q["exact_quota"])) < 1).all()            # rounding only
            mean = np.asarray(q["mean_prediction"])
            weights = size if mode == "size" else size * np.exp(-(mean - mean.min()) / temperature)
            log_w = np.asarray(q["log_weight"])
            np.testing.assert_allclose(np.exp(log_w - log_w.max()), weights / weights.max(), rtol=1e-9)
            np.testing.assert_allclose(q["exact_quota"], _water_fill(size, weights, budget), atol=1e-6)


def test_influence_quotas_favour_lower_mean_prediction():
    rng = np.random.default_rng(4)
    table = _scores(rng, [500, 500, 500], np.array([0.5, -0.5, 0.0]))   # lower = better
    con = metadata.connect()
    out = metadata.cluster_quotas(con, table, 300, "influence", 0.5).to_pydict()
    by_cluster = dict(zip(out["cluster"], out["quota"]))
    assert by_cluster[1] > by_cluster[2] > by_cluster[0]
    size_mode = metadata.cluster_quotas(con, table, 300, "size").to_pydict()
    assert size_mode["quota"] == [100, 100, 100]
    # a tiny temperature gives the best cluster everything it has, the rest to the next best
    cold = metadata.cluster_quotas(con, table, 700, "influence", 1e-3).to_pydict()
    assert dict(zip(cold["cluster"], cold["quota"])) == {0: 0, 1: 500, 2: 200}
    with pytest.raises(MatesError, match="budget"):
        metadata.cluster_quotas(con, table, 1501, "size")
    with pytest.raises(MatesError, match="mode"):
        metadata.cluster_quotas(con, table, 10, "biggest")
    with pytest.raises(MatesError, match="temperature"):
        metadata.cluster_quotas(con, table, 10, "influence", 0.0)


def _catalog(ids, hashes, sources):
    return pa.table({"sample_id": np.asarray(ids, dtype=np.int64), "source": sources, "text_sha1": hashes})


def test_dedup_keeps_the_lowest_prediction_per_text_hash():
    scores = pa.table({"sample_id": np.array([1, 2, 3, 4, 5, 6], dtype=np.int64),
                       "prediction": np.array([0.3, -0.2, 0.1, 0.5, 0.5, 0.0], dtype=np.float32),
                       "cluster": np.zeros(6, dtype=np.int32)})
    catalog = _catalog([1, 2, 3, 4, 5, 6, 7], ["a", "a", "b", "c", "c", "a", "z"], ["web"] * 7)
    kept = metadata.dedup(metadata.connect(), scores, catalog).to_pydict()
    assert kept["sample_id"] == [2, 3, 4]                 # a -> 2 (lowest), b -> 3, c -> 4 (tie: lower id)
    assert kept["copies"] == [3, 1, 2] and kept["text_sha1"] == ["a", "b", "c"]
    with pytest.raises(MatesError, match="not in the sample catalog"):
        metadata.dedup(metadata.connect(), scores, catalog.slice(0, 4))


def test_cluster_stats_and_top_per_cluster():
    scores = pa.table({"sample_id": np.arange(6, dtype=np.int64), "cluster": np.array([0, 0, 0, 1, 1, 1], np.int32),
                       "prediction": np.array([1.0, 2.0, 3.0, -1.0, 0.0, 4.0], np.float32)})
    catalog = _catalog(range(6), [str(i) for i in range(6)], ["web", "code", "web", "books", "books", "books"])
    con = metadata.connect()
    stats = metadata.cluster_stats(con, scores, catalog).to_pylist()
    assert [(r["cluster"], r["size"], r["mean_prediction"]) for r in stats] == [(0, 3, 2.0), (1, 3, 1.0)]
    assert stats[0]["sources"][0] == {"source": "web", "n": 2, "share": pytest.approx(2 / 3)}
    assert stats[1]["n_sources"] == 1
    quotas = pa.table({"cluster": np.array([0, 1], np.int32), "quota": np.array([1, 2])})
    assert metadata.top_per_cluster(con, scores, quotas)["sample_id"].to_pylist() == [0, 3, 4]


def test_selection_manifest_conforms_and_weights_are_bucket_shares():
    candidates = pa.table({"sample_id": np.array([9, 3, 5, 7, 1, 2], np.int64),
                           "cluster": np.array([0, 0, 2, 2, 2, -1], np.int32)})
    selected = np.array([True, False, True, True, False, False])
    table = metadata.selection_table(metadata.connect(), candidates, selected)
    assert table.schema.equals(tables.SELECTION, check_metadata=True)
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert table["sample_id"].to_pylist() == [1, 2, 3, 5, 7, 9]
    assert rows[9]["bucket"] == "c000" and rows[9]["weight"] == pytest.approx(1 / 3)
    assert rows[5]["bucket"] == "c002" and rows[5]["weight"] == pytest.approx(2 / 3)
    assert rows[2]["bucket"] == "" and rows[2]["weight"] == 0 and not rows[2]["selected"]
    with pytest.raises(MatesError, match="selected"):
        metadata.selection_table(metadata.connect(), candidates, selected[:3])


def test_queries_run_over_parquet_on_s3(bucket):
    rng = np.random.default_rng(5)
    scores = _scores(rng, [40, 25, 60], np.array([0.2, -0.3, 0.0]))
    ids = scores["sample_id"].to_numpy()
    hashes = [f"h{i % 110}" for i in range(len(ids))]             # 15 duplicated texts
    catalog = _catalog(ids, hashes, [["web", "code", "books"][i % 3] for i in range(len(ids))])
    data = join(bucket, "data")
    write_parquet(scores, data, "scores", "part-0.parquet")
    write_parquet(catalog, data, "catalog", "samples.parquet")
    scores_url, catalog_url = join(data, "scores", "part-0.parquet"), join(data, "catalog", "samples.parquet")

    con = metadata.connect(scores_url, catalog_url)
    local = metadata.connect()
    assert metadata.cluster_stats(con, scores_url, catalog_url).equals(metadata.cluster_stats(local, scores, catalog))
    assert metadata.dedup(con, scores_url, catalog_url).equals(metadata.dedup(local, scores, catalog))
    assert metadata.dedup(con, scores_url, catalog_url).num_rows == 110
    q = metadata.cluster_quotas(con, scores_url, 50, "influence", 0.3)
    assert q.equals(metadata.cluster_quotas(local, scores, 50, "influence", 0.3)) and sum(q["quota"].to_pylist()) == 50
    # a fresh connection registers s3fs by itself when handed an s3:// URL
    assert metadata.dedup(metadata.connect(), scores_url, catalog_url).num_rows == 110
    with pytest.raises(MatesError, match="could not be read"):
        metadata.dedup(con, join(data, "missing.parquet"), catalog_url)
