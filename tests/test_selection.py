"""Gumbel-top-k selection (MATES, DESIGN.md 2.3) and score buckets."""
import numpy as np
import pytest

from curation.select.gumbel import gumbel_top_k, ranks, score_buckets
from curation.select.candidates import candidate_pools
from curation.stage_job import n_selected
from schemas.errors import MatesError


def test_gumbel_max_samples_the_softmax_of_negative_scores():
    """k = 1 is the Gumbel-max trick: P(i) = softmax(-pred / tau)_i."""
    pred, tau = np.array([0.0, 0.5, 1.0, -0.5]), 0.5
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    for _ in range(20000):
        counts += gumbel_top_k(pred, 1, tau, rng)
    expected = np.exp(-pred / tau) / np.exp(-pred / tau).sum()
    np.testing.assert_allclose(counts / 20000, expected, atol=0.01)


def test_small_temperature_keeps_the_lowest_predictions():
    pred = np.random.default_rng(1).normal(size=200)
    mask = gumbel_top_k(pred, 40, 1e-6, np.random.default_rng(2))
    assert mask.sum() == 40 and set(np.flatnonzero(mask)) == set(np.argsort(pred)[:40])


def test_random_is_uniform():
    rng = np.random.default_rng(3)
    hits = sum(gumbel_top_k(np.zeros(10), 3, 0.5, rng) for _ in range(5000))
    np.testing.assert_allclose(hits / 5000, 0.3, atol=0.03)


def test_k_bounds():
    with pytest.raises(MatesError):
        gumbel_top_k(np.zeros(3), 4, 0.5, np.random.default_rng(0))
    assert gumbel_top_k(np.zeros(3), 0, 0.5, np.random.default_rng(0)).sum() == 0


def test_score_buckets_split_by_score_and_weights_sum_to_one():
    ids = np.arange(100, 110)
    pred = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    selected = np.array([True] * 8 + [False] * 2)
    table = score_buckets(ids, pred, selected, n_buckets=2)
    rows = table.to_pylist()
    assert [r["bucket"] for r in rows] == ["b001"] * 4 + ["b000"] * 4 + ["", ""]
    assert abs(sum(r["weight"] for r in rows if r["selected"]) / 4 - 1) < 1e-9  # 0.5 each, 4 rows per bucket
    assert ranks(pred).tolist() == list(range(9, -1, -1))


def test_candidate_pools_disjoint_and_checked():
    pools = candidate_pools([1000], count=3, per_stage=300, seed=5)
    assert sum(len(p) for p in pools) == len(set(np.concatenate(pools))) == 900
    with pytest.raises(MatesError, match="pool_per_stage"):
        candidate_pools([60, 40], count=3, per_stage=50, seed=5)
    assert n_selected(400, 0.5) == 200 and n_selected(3, 0.01) == 1


def test_standardized_selection_ignores_the_predictions_scale():
    """With `standardize`, τ is in units of the predictions' std: a shrunk regression output
    (std 0.2) selects exactly as its z-scores do, and far more selectively than raw at τ = 0.5."""
    signal = np.random.default_rng(0).normal(size=2000)
    shrunk = 0.2 * signal + 3.0
    a = gumbel_top_k(shrunk, 400, 0.5, np.random.default_rng(5), standardize=True)
    b = gumbel_top_k(signal, 400, 0.5, np.random.default_rng(5), standardize=False)
    assert np.array_equal(a, b)
    raw = gumbel_top_k(shrunk, 400, 0.5, np.random.default_rng(5))
    # lower is better: the standardized pick's mean signal is far lower than the raw pick's
    assert signal[a].mean() < -1.0 and signal[raw].mean() > -0.6
    const = gumbel_top_k(np.full(50, 2.0), 10, 0.5, np.random.default_rng(1), standardize=True)
    assert const.sum() == 10  # constant predictions (random) are not a division by zero
