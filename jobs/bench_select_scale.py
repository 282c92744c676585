"""`mates bench select`: Group-MATES selection with the default options as the pool grows.

Each size runs `python -m jobs.bench_select --rows N --dtype float16` in its own process (a
process's peak memory never goes down, so sizes in one process would hide each other's), and
the parent reads that child's own figures back: peak RSS (its `ru_maxrss`, the whole process:
interpreter, torch, DuckDB, the data) and CPU seconds (`process_time`, all threads). Wall and CPU seconds
are the pipeline's (dedup, k-means, quotas, greedy, stats, manifest), not the synthetic data's
generation. The machine's load average is written beside every size: on a shared machine wall
time is the figure other jobs move most.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = (100_000, 1_000_000, 5_000_000)
RESULT = os.path.join("training", "results", "bench", "select_scale.json")


def _one_size(n_rows: int, dim: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="mates-bench-select-") as tmp:
        out = os.path.join(tmp, "result.json")
        load_before = os.getloadavg()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench_select", "--rows", str(n_rows), "--dim", str(dim),
                                 "--dtype", "float16", "--global-rows", "0", "--json", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _, err = proc.communicate()  # stderr holds the progress lines
        if proc.returncode:
            raise RuntimeError(f"bench_select --rows {n_rows} failed ({proc.returncode}): {err[-2000:]}")
        with open(out) as handle:
            child = json.load(handle)
    peak_mb = max(child["peak_rss_mb"].values())
    row = {"n_rows": n_rows, "dim": dim, "dtype": child["dtype"], "k": child["k"],
           "selected": child["selected"], "embedding_bytes": child["embedding_bytes"],
           "pipeline_seconds": child["pipeline_seconds"], "pipeline_cpu_seconds": child["pipeline_cpu_seconds"],
           "seconds": child["seconds"], "cpu_seconds": child["cpu_seconds"], "peak_rss_mb": peak_mb,
           "peak_over_embedding_bytes": round(peak_mb * 2 ** 20 / child["embedding_bytes"], 2),
           "process_seconds": round(time.perf_counter() - started, 1),
           "load_average_before": [round(v, 2) for v in load_before],
           "load_average_after": [round(v, 2) for v in os.getloadavg()], "kmeans": child["kmeans"]}
    log(f"  {n_rows:>9,} rows: pipeline {row['pipeline_seconds']} s wall, {row['pipeline_cpu_seconds']} s CPU, "
        f"peak {peak_mb:,.0f} MB = {row['peak_over_embedding_bytes']}x the embeddings (load {load_before[0]:.1f})")
    return row


def bench_select_scale(sizes=SIZES, dim: int = 384, out: str | None = RESULT, log=print) -> dict:
    """Every size in its own process; ratios of the largest two; written to `out` (JSON)."""
    rows = [_one_size(n, dim, log) for n in sizes]
    result = {"rows": rows, "cpu_count": os.cpu_count(),
              "note": "pipeline seconds exclude generating the synthetic rows; peak_rss_mb is the child "
                      "process's high-water mark (ru_maxrss) over everything, generation included"}
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        result["ratios_last_two"] = {
            "rows": round(b["n_rows"] / a["n_rows"], 2),
            "wall": round(b["pipeline_seconds"] / a["pipeline_seconds"], 2),
            "cpu": round(b["pipeline_cpu_seconds"] / a["pipeline_cpu_seconds"], 2),
            "peak_rss": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return result
