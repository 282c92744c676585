"""Group-MATES' k-means tree groups dealt to ranks (curation/methods/group_deal.py): the deal, and
ranks in threads handing each other files give one rank's labels and picks, or name a failed rank."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from curation.methods import group_deal
from curation.select.clustering import cluster_embeddings, unit_matrix
from curation.select.greedy import select_per_cluster
from curation.store.rank_files import PeerFailed, read_arrays, telling_failure
from schemas.errors import MatesError
from schemas.storage import store_for


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_deal_is_balanced_deterministic_and_gives_each_group_once():
    assert group_deal.deal([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]       # loads 7 and 7
    assert group_deal.deal([1, 1], 3) == [[0], [1], []]                      # ties to the lowest rank
    assert group_deal.deal([4, 9], 1) == [[0, 1]]
    rng = np.random.default_rng(0)
    for world in (2, 3, 5):
        costs = rng.integers(1, 100, size=17).tolist()
        hands = group_deal.deal(costs, world)
        assert hands == group_deal.deal(costs, world)
        assert sorted(g for h in hands for g in h) == list(range(17))
        loads = [sum(costs[g] for g in h) for h in hands]
        assert max(loads) - min(loads) <= max(costs)   # longest-first to the least loaded
    with pytest.raises(MatesError, match="world_size"):
        group_deal.deal([1], 0)


def test_assembly_refuses_a_dropped_or_foreign_share():
    parts = [(np.array([0, 2]), np.array([5, 6], np.int32)), (np.array([1, 3]), np.array([7, 8], np.int32))]
    assert group_deal.assemble_labels(4, parts).tolist() == [5, 7, 6, 8]
    with pytest.raises(MatesError, match="1 missing"):
        group_deal.assemble_labels(4, parts[:1] + [(np.array([1]), np.array([7]))])
    with pytest.raises(MatesError, match="2 missing"):                        # a rank's share dropped
        group_deal.assemble_labels(4, parts[:1])
    with pytest.raises(MatesError, match="1 repeated"):
        group_deal.assemble_labels(4, parts + [(np.array([3]), np.array([9]))])
    shares = [(np.array([0, 2]), np.array([2]), 1), (np.array([1, 3]), np.array([1, 3]), 2)]
    assert group_deal.assemble_picks(4, shares).tolist() == [False, True, True, True]
    with pytest.raises(MatesError, match="share 1"):                          # a row of another share
        group_deal.assemble_picks(4, shares[:1] + [(np.array([1, 3]), np.array([1, 2]), 2)])
    with pytest.raises(MatesError, match="share 0"):                          # short of its quotas
        group_deal.assemble_picks(4, [(np.array([0, 2]), np.array([], np.int64), 1)] + shares[1:])


def _inputs(dtype, scale=1.0, n=300):
    """`n` rows near 12 directions (of norm `scale`) and their predictions."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(12, 8))
    x = centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, 8))
    x *= scale / np.linalg.norm(x, axis=1, keepdims=True)
    return torch.as_tensor(x, dtype=dtype), rng.normal(size=n)


_current = threading.local()   # the rank a thread runs (the failure test breaks one)


def _run_ranks(url, world, emb, pred, k, seed):
    """Rank 0 (`DealtSelection`) and ranks 1.. (`rank_part`) in threads, each under `telling_failure`."""
    out, errors = {}, {}

    def rank(r):
        _current.rank = r
        try:
            with telling_failure(url, r):
                if r:
                    out[r] = group_deal.rank_part(url, r, device="cpu")
                    return
                dealt = group_deal.DealtSelection(url, world, device="cpu")
                labels = dealt.labels(unit_matrix(emb, k), emb, pred, k, seed=seed)
                eligible = labels.copy()
                eligible[::7] = -1
                sizes = np.bincount(eligible[eligible >= 0], minlength=k)
                quotas = {c: int(min(n, 2)) for c, n in enumerate(sizes) if n}
                mask = dealt.mask(eligible, quotas, alpha=1.3, beta=0.8, interaction=True)
                out[0] = (labels, eligible, quotas, mask, dealt.working())
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return out, errors


# the 60,000-row case has groups big enough for capped leaves (`clustering.LEAF_FULL_PASSES`),
# which a dealt group must run as rank 0's own tree does
@pytest.mark.parametrize("dtype, scale, n", [(torch.float32, 1.0, 300), (torch.float16, 1.0, 300),
                                             (torch.float32, 2.0, 300), (torch.float32, 1.0, 60_000)])
def test_dealt_groups_give_one_ranks_labels_and_picks(tmp_path, dtype, scale, n):
    """Unit rows, fp16 rows (handed on as fp16), rows the k-means normalises but the greedy reads
    as given, and groups whose leaves run capped passes."""
    emb, pred = _inputs(dtype, scale, n)
    url, k = str(tmp_path / "stage"), 80          # > BRANCH (64): a tree of 9 groups for 3 ranks
    out, errors = _run_ranks(url, 3, emb, pred, k, seed=11)
    assert not errors, errors
    labels, eligible, quotas, mask, working = out[0]
    assert labels.tolist() == cluster_embeddings(emb, k, seed=11).tolist()
    expected = select_per_cluster(pred, emb, eligible, quotas, alpha=1.3, beta=0.8, device="cpu")
    assert mask.tolist() == expected.tolist() and mask.sum() == sum(quotas.values())
    assert working == [0, 1, 2] and out[1] and out[2]   # every rank clustered and selected a share
    for r in (1, 2):
        assert all(store_for(url).exists("ranks", f"{kind}-{r:05d}.npy") for kind in ("labels", "picks"))
    share = read_arrays(url, "share-00001")
    assert share["emb"].dtype == np.dtype(dtype == torch.float16 and "float16" or "float32")
    assert ("unit" in share) == (scale != 1.0)


def test_one_group_stays_on_rank_0(tmp_path):
    emb, pred = _inputs(torch.float32)
    out, errors = _run_ranks(str(tmp_path / "stage"), 2, emb, pred, 5, seed=2)   # flat k-means
    assert not errors and out[1] is False and out[0][4] == [0]
    assert out[0][0].tolist() == cluster_embeddings(emb, 5, seed=2).tolist()


@pytest.mark.parametrize("fail, where", [(0, "plan_tree"), (1, "cluster_share")])
def test_a_rank_failing_in_the_dealt_phase_is_named(tmp_path, monkeypatch, fail, where):
    """Rank 0 breaks before dealing (rank 1 waits for its share), or rank 1 clustering its share
    (rank 0 waits for its labels): the other raises naming it, as at the rest of a boundary."""
    emb, pred = _inputs(torch.float32)
    real = getattr(group_deal, where)

    def broken(*args, **kw):
        if getattr(_current, "rank", None) == fail:
            raise ValueError(f"rank {fail} broke")
        return real(*args, **kw)

    monkeypatch.setattr(group_deal, where, broken)
    url = str(tmp_path / "stage")
    _, errors = _run_ranks(url, 2, emb, pred, 80, seed=11)
    assert isinstance(errors[fail], ValueError)
    assert isinstance(errors[1 - fail], PeerFailed) and f"rank(s) [{fail}] failed" in str(errors[1 - fail])
    assert store_for(url).exists("ranks", f"failed-{fail:05d}.txt")
