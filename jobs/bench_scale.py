"""`mates bench scale`: one stage boundary's memory, time and reads as the pool grows (issue 22).

    mates bench scale [--sizes 1e5,1e6,1e7] [--candidates 1e5] [--methods mates@frozen,group_mates@frozen]
                      [--dir /tmp/mates-bench-scale] [--out training/results/bench/scale.json]

For every pool size N a synthetic `<data>` folder is generated once (jobs/bench_scale_data.py:
MDS pool, catalog, fp16 embedding store, tokenizer, target set, probe state; reused while its
stamp matches, since 10^7 is the slow part), then for every method one boundary runs in a FRESH
process (`python -m jobs.bench_scale --child SPEC`), so the peak RSS is that boundary's alone:
stage 1 of `run_stage_job` with `--candidates` candidates from the stage loop's
`candidate_pools` (stage 1's pool when the pool holds two, else stage 0's), the frozen backbone
over the fp16 store, 256 forward probes of a tiny GPT-2 (group_mates: 16 trajectories x 10),
half the candidates selected, one torch thread. Per (N, method):

* `peak_rss_mb`: the child's `ru_maxrss` (os.wait4 on that child: the interpreter, torch, DuckDB
  and the boundary); `rss_by_phase_mb`: the peak of a 20 Hz /proc/self/statm sampler between
  the boundary's log lines (each line ends a phase);
* `seconds`: the `_SUCCESS` marker's `seconds_<phase>` and `curation_seconds`, plus `candidates`
  (drawing them) and `wall` (the whole `run_stage_job`);
* `store_bytes_read`: bytes read through schemas/storage.py during the boundary (its counter:
  `read_bytes`, `read_parquet`, `get_file`, `open_read` streams), by folder; `syscall_bytes_read`:
  the process's `rchar` (/proc/self/io) over the same span, which also sees reads that bypass
  the store layer (streaming's shard reader and the shard hash checks of `MDSFolder` on a local
  pool, DuckDB reading the catalog's local path) and any module loaded on first use;
* `candidate_bytes` = candidates x (seq_len x 2 bytes of uint16 tokens + 384 x 2 bytes of fp16
  embedding): what a boundary that read only its candidates would read; the ratios are over it.

A child may use at most 85% of the machine's memory (RLIMIT_DATA, its private writable memory,
~1 GB above its RSS once torch is loaded; RLIMIT_AS would count the 3.6 GB of address space
torch's libraries map): past it the boundary fails with MemoryError in its own process (not the
kernel's OOM killer, which may pick another process), and its row says `failed` with the peak it
reached; the bench goes on with the next one.

Verdicts (issue 22): peak RSS at the largest size <= 1.3x that at the size below it (a
boundary's memory does not grow with the pool), and bytes read per boundary <= 1.5x the
candidates' bytes (both the store counter and rchar are given; the load average at each start).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

RESULT = os.path.join("training", "results", "bench", "scale.json")
SIZES = (100_000, 1_000_000, 10_000_000)
METHODS = ("mates@frozen", "group_mates@frozen")
DIM = 384


def parse_count(text: str, flag: str) -> int:
    """`1e5`, `100000` or `100_000` -> 100000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 1 or value != int(value):
        from schemas.errors import MatesError

        raise MatesError(f"`{flag}` takes whole counts such as 1e5 or 100000; got {text!r}.")
    return int(value)


def parse_methods(text: str) -> list[str]:
    """`mates@frozen,group_mates@frozen` -> the list; only the frozen-backbone entries are benched."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        from schemas.errors import MatesError

        raise MatesError(f"`--methods` must be a comma-separated list of {', '.join(METHODS)}; got {text!r}.")
    return methods


# ---------------------------------------------------------------- the child: one boundary
class _RssSampler(threading.Thread):
    """Resident set size every 50 ms; `mark(msg)` closes a phase with the peak seen since the last mark."""

    def __init__(self):
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self.phases, self.t0, self.done = 0, [], time.perf_counter(), threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def run(self):
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def mark(self, message: str) -> None:
        peak, self.peak = max(self.peak, self.rss()), 0
        self.phases.append({"t": round(time.perf_counter() - self.t0, 2), "peak_rss_mb": round(peak / 2 ** 20, 1),
                            "rchar_mb": round(_rchar() / 1e6, 1), "line": message.strip()[:160]})


def _rchar() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def _candidates(data: str, n: int, seed: int, mode: str = "shards"):
    """Stage 1's candidates as the stage loop draws them (stage 0's when the pool holds only one)
    under `stages.candidates: <mode>` over the pool's samples per shard (its index.json). The
    default is `shards`: 10^5 candidates span under 64 of these 32 MiB shards, where `auto` would
    draw per sample and every boundary would read the whole pool (README "Locality")."""
    from curation.select.candidates import candidate_pools
    from curation.store.pool import shard_samples

    sizes = shard_samples(data.rstrip("/") + "/pool")
    count = 2 if sum(sizes) >= 2 * n else 1
    return candidate_pools(sizes, count=count, per_stage=n, seed=seed, mode=mode)[count - 1]


def _by_folder(reads: dict, roots: dict) -> dict:
    out = {}
    for path, n in reads.items():
        name = next((f"{label}/{os.path.relpath(path, root).split(os.sep)[0]}" for label, root in roots.items()
                     if path.startswith(root + os.sep)), "other")
        out[name] = out.get(name, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_child(spec: dict) -> dict:
    """One boundary in this process (see the module docstring); returns its figures."""
    import torch

    torch.set_num_threads(spec["threads"])
    # every module the boundary loads, loaded before the measured span: importing transformers
    # alone reads ~145 MB (rchar) of files, which are not the boundary's reads
    import duckdb  # noqa: F401
    import streaming  # noqa: F401

    import curation.influence.frozen_head  # noqa: F401
    import curation.influence.relational  # noqa: F401
    import curation.lm.model  # noqa: F401
    import curation.methods.group_mates_method  # noqa: F401
    import curation.oracle.forward  # noqa: F401
    import curation.oracle.probes  # noqa: F401
    import curation.oracle.trajectories  # noqa: F401
    import curation.select.clustering  # noqa: F401
    import curation.select.greedy  # noqa: F401
    from curation.methods.base import StageContext
    from curation.stage_job import n_selected, run_stage_job
    from jobs.bench_scale_data import TARGET, method_options
    from schemas.storage import reset_reads

    method, _, _ = spec["method"].partition("@")
    sampler = _RssSampler()
    sampler.start()
    sampler.mark("imports")
    reset_reads()
    rchar0, t0 = _rchar(), time.perf_counter()
    candidates = _candidates(spec["data"], spec["candidates"], spec["seed"], spec["candidates_mode"])
    seconds_candidates = time.perf_counter() - t0
    sampler.mark("candidates drawn")
    ctx = StageContext(run_url=spec["run"], data_url=spec["data"], stage=1, candidates=candidates,
                       n_select=n_selected(len(candidates), 0.5), seed=spec["seed"],
                       options=method_options(method, spec["n_probes"]), state_url=spec["state"], target=TARGET,
                       log=sampler.mark)
    run_stage_job(ctx, method)
    wall = time.perf_counter() - t0
    rchar, reads = _rchar() - rchar0, reset_reads()
    sampler.done.set()
    sampler.mark("index written")
    with open(os.path.join(spec["run"], "stages", "1", "_SUCCESS")) as handle:
        marker = json.load(handle)
    seconds = {k.removeprefix("seconds_"): round(v, 3) for k, v in marker.items()
               if k.startswith("seconds_") and isinstance(v, (int, float))}
    return {"seconds": seconds | {"curation": round(marker.get("curation_seconds", 0.0), 3),
                                  "candidates": round(seconds_candidates, 3), "wall": round(wall, 3)},
            "store_bytes_read": sum(reads.values()),
            "store_bytes_by_folder": _by_folder(reads, {"data": spec["data"], "run": spec["run"],
                                                        "state": os.path.dirname(spec["state"])}),
            "syscall_bytes_read": rchar, "rss_by_phase_mb": sampler.phases,
            "self_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "selected": int(marker.get("selected", 0) or 0)}


# ---------------------------------------------------------------- the parent
def _boundary(data: dict, method: str, n_candidates: int, *, scratch: str, n_probes: int, threads: int,
              candidates_mode: str, log) -> dict:
    run = os.path.join(scratch, "runs", f"n{data['n']}-{method.replace('@', '-')}")
    shutil.rmtree(run, ignore_errors=True)
    spec = {"n": data["n"], "candidates": n_candidates, "method": method, "data": data["data"], "run": run,
            "state": data["state"], "seed": data["seed"], "n_probes": n_probes, "threads": threads,
            "candidates_mode": candidates_mode,
            "out": os.path.join(scratch, "runs", "child.json")}
    with open(spec["out"] + ".spec", "w") as handle:
        json.dump(spec, handle)
    load = os.getloadavg()
    started = time.perf_counter()
    cap = _memory_cap()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.bench_scale", "--child", spec["out"] + ".spec"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)))
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)   # this child's own rusage, not every child's maximum
    proc.returncode = os.waitstatus_to_exitcode(status)
    head = {"n": data["n"], "method": method, "candidates": n_candidates, "candidates_mode": candidates_mode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "data_cap_gb": round(cap / 2 ** 30, 1)}
    if proc.returncode:  # a boundary that runs out of memory is a result too: say so and go on
        lines = [line for line in err.strip().splitlines() if line.strip()] or ["(no output)"]
        log(f"  N={data['n']:>10,} {method:<19} FAILED ({proc.returncode}) at peak {head['peak_rss_mb']:,.0f} MB: "
            f"{lines[-1][:200]}")
        return head | {"failed": f"exit {proc.returncode}: {lines[-1][:500]}",
                       "load_average_before": [round(v, 2) for v in load]}
    with open(spec["out"]) as handle:
        child = json.load(handle)
    candidate_bytes = n_candidates * (data["seq_len"] * 2 + DIM * 2)
    row = {**head, **child, "candidate_bytes": candidate_bytes,
           "store_read_ratio": round(child["store_bytes_read"] / candidate_bytes, 3),
           "syscall_read_ratio": round(child["syscall_bytes_read"] / candidate_bytes, 3),
           "process_seconds": round(time.perf_counter() - started, 1),
           "load_average_before": [round(v, 2) for v in load], "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    log(f"  N={data['n']:>10,} {method:<19} peak {row['peak_rss_mb']:>7,.0f} MB, curation {child['seconds']['curation']:.1f} s, "
        f"read {row['store_read_ratio']}x (store) / {row['syscall_read_ratio']}x (rchar) the candidates' "
        f"{candidate_bytes / 1e6:.0f} MB (load {load[0]:.1f})")
    return row


def _memory_cap() -> int:
    """85% of the machine's memory, for RLIMIT_DATA (see the module docstring)."""
    with open("/proc/meminfo") as handle:
        total_kb = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1])
    return int(0.85 * total_kb * 1024)


def bench_scale(sizes=SIZES, candidates: int = 100_000, methods=METHODS, *, scratch: str | None = None,
                out: str | None = RESULT, n_probes: int = 256, threads: int = 1, candidates_mode: str = "shards",
                log=print, **data_kw) -> dict:
    """Generate (or reuse) each size's data, run one boundary per (size, method); written to `out`."""
    from jobs.bench_scale_data import ensure_data, settings

    scratch = scratch or os.path.join("/tmp", "mates-bench-scale")
    os.makedirs(os.path.join(scratch, "runs"), exist_ok=True)
    rows, data_rows = [], []
    for n in sizes:
        t0 = time.perf_counter()
        data = ensure_data(scratch, settings(n, **data_kw), log=log)
        log(f"N={n:,}: data {'reused' if data['reused'] else 'generated'} in {time.perf_counter() - t0:.1f} s "
            f"({data['bytes']['total'] / 1e9:.2f} GB, {data['shards']} shards) under {os.path.dirname(data['data'])}")
        data_rows.append({k: data[k] for k in ("n", "shards", "bytes", "generate_seconds", "reused")})
        rows += [_boundary(data, m, min(candidates, n), scratch=scratch, n_probes=n_probes, threads=threads,
                             candidates_mode=candidates_mode, log=log)
                 for m in methods]
    result = {"rows": rows, "data": data_rows, "cpu_count": os.cpu_count(), "verdicts": verdicts(rows)}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return result


def verdicts(rows: list[dict]) -> dict:
    """Peak RSS of the largest size over the one below it (per method, <= 1.3), and the largest
    read ratio (<= 1.5), by the store counter and by rchar."""
    done = [r for r in rows if "failed" not in r]
    out = {"failed": [f"N={r['n']} {r['method']}: {r['failed']}" for r in rows if "failed" in r],
           "read_ratio_max": {"store": max((r["store_read_ratio"] for r in done), default=None),
                              "syscall": max((r["syscall_read_ratio"] for r in done), default=None)}}
    out["reads_pass"] = not out["failed"] and bool(done) and out["read_ratio_max"]["store"] <= 1.5
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) >= 2:  # a failed boundary's peak is where it stopped: a lower bound, and a fail
        by = {(r["n"], r["method"]): r for r in rows}
        out["rss_sizes"] = sizes[-2:]
        out["rss_ratio"] = {m: round(by[(sizes[-1], m)]["peak_rss_mb"] / by[(sizes[-2], m)]["peak_rss_mb"], 3)
                            for m in sorted({r["method"] for r in rows})
                            if (sizes[-2], m) in by and (sizes[-1], m) in by}
        out["rss_pass"] = not out["failed"] and all(v <= 1.3 for v in out["rss_ratio"].values())
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    with open(sys.argv[2]) as handle:
        _spec = json.load(handle)
    _result = run_child(_spec)
    with open(_spec["out"], "w") as handle:
        json.dump(_result, handle, indent=2)
