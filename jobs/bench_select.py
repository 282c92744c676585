"""Group-MATES selection at scale (DESIGN.md 2.4), on synthetic scored rows.

    python -m jobs.bench_select [--rows 1000000] [--dim 384] [--k N/2000] [--threads 1] [--json out.json]

Data: `n_rows` unit embeddings from a mixture of Gaussians on the sphere (N/2000 topics of
log-normal sizes; h = normalise(centre + noise), cos(h, centre) ~ 0.7), individual scores
s = w·h with w a random mix of the topic centres (so topics differ in mean score, as the linear
influence head would make them), and a catalog (sample_id, source, text_sha1) with ~1% exact
duplicates. The embeddings are generated in chunks: they are the one big array (N·D·4 bytes).

Pipeline, each phase timed: DuckDB dedup by text hash -> spherical k-means over all rows ->
DuckDB cluster stats and quotas ('influence' mode) -> per-cluster greedy -> DuckDB manifest.
Next to it, on a random subset of `global_rows` rows: the global greedy (O(N² D)) against the
same pipeline on those rows (k = rows / 2000), with the overlap, mean score and redundancy (mean
pairwise cosine) of each selection, and plain top-k by score for reference.

Memory: `peak_rss_mb` is the process's resident high-water mark (getrusage ru_maxrss, Linux
KiB) after each phase, so it includes the Python interpreter, torch, DuckDB and the data (no
tracemalloc: it sees neither torch's allocator nor DuckDB's). `seconds` are wall time,
`cpu_seconds` process time (user + system, all threads): on a shared machine the gap is the
time other jobs took.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

ROWS_PER_CLUSTER = 2000


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def synthetic_pool(n_rows: int, dim: int, n_topics: int, seed: int, dup_fraction: float = 0.01,
                   dtype: torch.dtype = torch.float32):
    """(emb [N, D] unit rows of `dtype`, scores [N] float32, catalog pa.Table); fp16 rows are made
    chunk by chunk, never as one fp32 matrix."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_topics, dim, generator=gen), dim=1)  # [T, D]
    sizes = torch.exp(0.5 * torch.randn(n_topics, generator=gen))                                # [T] log-normal
    w = torch.randn(n_topics, generator=gen) @ centres                                             # [D]
    emb = torch.empty(n_rows, dim, dtype=dtype)
    topic = torch.empty(n_rows, dtype=torch.long)
    scores = np.empty(n_rows, dtype=np.float32)
    for i in range(0, n_rows, 1 << 16):
        j = min(n_rows, i + (1 << 16))
        topic[i:j] = torch.multinomial(sizes, j - i, replacement=True, generator=gen)
        noise = torch.randn(j - i, dim, generator=gen) / dim ** 0.5                            # [c, D] norm ~1
        emb[i:j] = torch.nn.functional.normalize(centres[topic[i:j]] + noise, dim=1)
        scores[i:j] = (emb[i:j].float() @ w).numpy()                                               # [c] s = w·h

    rng = np.random.default_rng(seed)
    topic_np = topic.numpy()
    source = np.where(rng.random(n_rows) < 0.8, topic_np % 5, rng.integers(0, 5, n_rows)).astype(np.int32)
    key = np.arange(n_rows)
    dups = rng.choice(n_rows, int(dup_fraction * n_rows), replace=False)
    key[dups] = rng.integers(0, n_rows, len(dups))        # same text as another (random) row
    names = pa.array(["web", "code", "books", "wiki", "papers"])
    catalog = pa.table({"sample_id": np.arange(n_rows, dtype=np.int64),
                        "source": pa.DictionaryArray.from_arrays(pa.array(source), names).dictionary_decode(),
                        "text_sha1": pa.array(key).cast(pa.string())})   # stand-in for the sha1 hex
    return emb, scores, catalog


class _Phases:
    """Wall and CPU seconds per named phase, and the RSS high-water mark after each."""

    def __init__(self):
        self.wall, self.cpu, self.rss = {}, {}, {"after_imports": _rss_mb()}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall, 2)
        self.cpu[name] = round(time.process_time() - cpu, 2)
        self.rss[f"after_{name}"] = _rss_mb()


def _selection_figures(scores: np.ndarray, emb: torch.Tensor, mask: np.ndarray) -> dict:
    """Mean score and mean pairwise cosine (redundancy) of a selection, order-free."""
    rows = torch.from_numpy(np.flatnonzero(mask))
    q = len(rows)
    total = emb[rows].double().sum(dim=0)                                                          # [D]
    pairwise = (float(total @ total) - q) / max(q * (q - 1), 1)   # mean of h_i·h_j over i != j
    return {"mean_score": round(float(scores[mask].mean()), 4), "mean_pairwise_cos": round(pairwise, 4)}


def bench_select(n_rows: int = 1_000_000, dim: int = 384, k: int | None = None, budget_ratio: float = 0.2,
                 seed: int = 0, global_rows: int = 20_000, *, max_iter: int = 20, tol: float | None = None,
                 mode: str = "influence", temperature: float = 1.0, alpha: float = 1.0, beta: float = 1.0,
                 threads: int = 1, dtype: str = "float32", log=print) -> dict:
    """Figures of the Group-MATES selection pipeline on `n_rows` synthetic rows (module docstring).

    `k` defaults to the recipe's: n_rows / `cluster_size` (2000). `threads` sets torch's intra-op threads for the run (0: torch's
    default). One is the default: on a 2-core machine shared with other jobs, OpenMP's barriers over
    the many small tensor ops of the pruned k-means passes made the run 2.5x slower with 2 threads.
    """
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        from curation.select.clustering import n_clusters_for

        return _bench_select(n_rows, dim, n_clusters_for(n_rows, ROWS_PER_CLUSTER, k), budget_ratio, seed,
                             global_rows, max_iter=max_iter, tol=tol, mode=mode, temperature=temperature,
                             alpha=alpha, beta=beta, dtype=getattr(torch, dtype), log=log)
    finally:
        torch.set_num_threads(saved_threads)


def _bench_select(n_rows, dim, k, budget_ratio, seed, global_rows, *, max_iter, tol, mode, temperature,
                  alpha, beta, dtype, log) -> dict:
    from curation.select import metadata
    from curation.select.clustering import cluster_embeddings
    from curation.select.greedy import select_per_cluster
    from curation.data.pool_parts import catalog_file
    from curation.store.catalog import catalog_files
    from schemas.storage import write_parquet

    phase = _Phases()
    with phase("generate_data"):
        emb, scores, catalog = synthetic_pool(n_rows, dim, max(1, n_rows // ROWS_PER_CLUSTER), seed, dtype=dtype)
    ids = catalog.column("sample_id").to_numpy()
    log(f"bench_select: {n_rows} x {dim} rows in {phase.wall['generate_data']}s; k = {k}, "
        f"torch threads = {torch.get_num_threads()}")
    km, greedy_stats = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(catalog, tmp, "catalog", catalog_file(0))       # a one-part pool's catalog
        catalog_url = catalog_files(tmp)
        con = metadata.connect(*catalog_url)
        with phase("dedup"):
            kept = metadata.dedup(con, pa.table({"sample_id": ids, "prediction": scores}), catalog_url)
            keep = np.zeros(n_rows, dtype=bool)
            keep[kept.column("sample_id").to_numpy()] = True       # sample ids are row numbers here
        budget = int(budget_ratio * int(keep.sum()))
        log(f"  dedup: kept {int(keep.sum())} of {n_rows} ({phase.wall['dedup']}s)")
        with phase("kmeans"):
            labels = cluster_embeddings(emb, k, seed=seed, max_iter=max_iter, tol=tol, stats=km)
            labels = np.where(keep, labels.numpy(), -1).astype(np.int32)   # duplicates: no cluster
        log(f"  k-means: {km['levels']} level(s), {km['kmeans_runs']} k-means runs ({phase.wall['kmeans']}s)")
        table = pa.table({"sample_id": ids, "prediction": scores, "cluster": labels})
        clustered = table.filter(pc.greater_equal(table["cluster"], 0))
        with phase("quotas"):
            quotas = metadata.cluster_quotas(con, clustered, budget, mode, temperature)
        with phase("greedy"):
            mask = select_per_cluster(scores, emb, labels, metadata.quotas_dict(quotas), alpha=alpha,
                                      beta=beta, stats=greedy_stats)
        log(f"  quotas ({phase.wall['quotas']}s), per-cluster greedy ({phase.wall['greedy']}s)")
        with phase("cluster_stats"):
            stats = metadata.cluster_stats(con, clustered, catalog_url)
        with phase("manifest"):
            write_parquet(metadata.selection_table(con, table, mask), tmp, "selection.parquet")
        con.close()

    sizes = np.asarray(stats.column("size"))
    q = np.asarray(quotas.column("quota"))
    timed = [name for name in phase.wall if name != "generate_data"]
    result = {
        "n_rows": n_rows, "dim": dim, "dtype": str(emb.dtype).removeprefix("torch."),
        "embedding_bytes": emb.numel() * emb.element_size(), "k": k, "budget": budget, "selected": int(mask.sum()),
        "kept_after_dedup": int(keep.sum()), "torch_threads": torch.get_num_threads(),
        "pipeline_seconds": round(sum(phase.wall[name] for name in timed), 2),
        "pipeline_cpu_seconds": round(sum(phase.cpu[name] for name in timed), 2),
        "seconds": phase.wall, "cpu_seconds": phase.cpu,
        "peak_rss_mb": phase.rss,
        "kmeans": km, "greedy_gemm_blocks": greedy_stats.get("blocks", 0),
        "cluster_size": {"min": int(sizes.min()), "median": int(np.median(sizes)), "max": int(sizes.max())},
        "quota": {"mode": mode, "temperature": temperature, "min": int(q.min()), "max": int(q.max()),
                  "clusters_full": int((q == np.asarray(quotas.column("size"))).sum())},
        "cost_ratio_sum_nc2_over_n2": round(float((sizes.astype(float) ** 2).sum() / float(keep.sum()) ** 2), 6),
        "memory_note": "peak_rss_mb = getrusage ru_maxrss high-water mark of the whole process "
                       "(interpreter, torch, DuckDB, data) after each phase; cpu_seconds = process_time",
    }
    if global_rows <= 0:
        result["peak_rss_mb"]["end"] = _rss_mb()
        return result
    log("  comparison on a subset ...")
    result["subset"] = _subset_comparison(emb, scores, ids, global_rows, budget_ratio, seed, mode=mode,
                                          temperature=temperature, alpha=alpha, beta=beta,
                                          max_iter=max_iter, tol=tol)
    result["peak_rss_mb"]["end"] = _rss_mb()
    return result


def _subset_comparison(emb, scores, ids, n_sub, budget_ratio, seed, *, mode, temperature, alpha, beta,
                       max_iter, tol) -> dict:
    """Global greedy vs per-cluster greedy (k = rows / 2000) on the same random rows."""
    from curation.select import metadata
    from curation.select.kmeans import spherical_kmeans
    from curation.select.greedy import global_greedy, select_per_cluster

    rng = np.random.default_rng([seed, 1])
    rows = np.sort(rng.choice(len(scores), min(n_sub, len(scores)), replace=False))
    e, s, i = emb[torch.from_numpy(rows)], scores[rows], ids[rows]
    budget = int(budget_ratio * len(rows))
    k_sub = max(1, len(rows) // ROWS_PER_CLUSTER)
    phase = _Phases()
    with phase("global_greedy"):
        g_mask = global_greedy(s, e, budget, alpha=alpha, beta=beta)
    with phase("global_greedy_matvec"):     # block=1: one matvec per pick, the textbook loop
        g1_mask = global_greedy(s, e, budget, alpha=alpha, beta=beta, block=1)
    with phase("kmeans"):
        labels = spherical_kmeans(e, k_sub, seed=seed, max_iter=max_iter, tol=0.0 if tol is None else tol)[0].numpy()
    con = metadata.connect()
    with phase("quotas"):
        quotas = metadata.cluster_quotas(con, pa.table({"sample_id": i, "prediction": s, "cluster": labels}),
                                         budget, mode, temperature)
    con.close()
    with phase("greedy"):
        c_mask = select_per_cluster(s, e, labels, metadata.quotas_dict(quotas), alpha=alpha, beta=beta)
    with phase("greedy_matvec"):
        c1_mask = select_per_cluster(s, e, labels, metadata.quotas_dict(quotas), alpha=alpha, beta=beta, block=1)
    top = np.zeros(len(rows), dtype=bool)
    top[np.argsort(s, kind="stable")[:budget]] = True
    per_cluster = phase.wall["kmeans"] + phase.wall["quotas"] + phase.wall["greedy"]
    return {
        "rows": len(rows), "budget": budget, "k": k_sub, "seconds": phase.wall, "cpu_seconds": phase.cpu,
        "per_cluster_total_seconds": round(per_cluster, 2),
        "speedup_greedy_only": round(phase.wall["global_greedy"] / max(phase.wall["greedy"], 1e-9), 1),
        "speedup_greedy_only_matvec": round(phase.wall["global_greedy_matvec"]
                                            / max(phase.wall["greedy_matvec"], 1e-9), 1),
        "speedup_with_kmeans_and_quotas": round(phase.wall["global_greedy"] / max(per_cluster, 1e-9), 1),
        "block_equals_matvec": bool((g_mask == g1_mask).all() and (c_mask == c1_mask).all()),
        "overlap_with_global": round(float((g_mask & c_mask).sum()) / max(budget, 1), 4),
        "overlap_top_k_with_global": round(float((g_mask & top).sum()) / max(budget, 1), 4),
        "global": _selection_figures(s, e, g_mask),
        "per_cluster": _selection_figures(s, e, c_mask),
        "top_k_by_score": _selection_figures(s, e, top),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=None, help="clusters (default rows / 2000)")
    parser.add_argument("--budget-ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--global-rows", type=int, default=20_000)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--tol", type=float, default=None, help="k-means tol (default: the method's, "
                        "0 for flat k-means and clustering.LEAF_TOL for a tree's leaves)")
    parser.add_argument("--mode", choices=["size", "influence"], default="influence")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = bench_select(args.rows, args.dim, args.k, args.budget_ratio, args.seed, args.global_rows,
                          max_iter=args.max_iter, tol=args.tol, mode=args.mode, temperature=args.temperature,
                          threads=args.threads, dtype=args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
