"""`mates bench bounds`: the worst input of each bounded kind (schemas/bounds.py), refused how fast
and with how much memory.

Each case writes its hostile input, then runs the `mates` command a user would in a fresh
process, which reports (on its last stderr line) the seconds spent in `main` and the process's
peak resident memory. `baseline` is the same command on a small valid input, refused at once
for another reason, so `peak_mb - baseline_mb` is what the hostile input itself cost.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "training", "recipes", "micro.yaml")
# Runs `main` in a fresh interpreter and reports its time and the process's peak RSS (VmHWM:
# ru_maxrss would also count the parent's memory at the fork, which Linux carries over exec).
_CHILD = """
import json, sys, time
from jobs.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - t, "peak_mb": hwm / 1024}), file=sys.stderr)
"""


def _laughs(levels: int) -> str:
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nvariables: {{x: *l{levels - 1}}}\n"


def _cases(tmp: str) -> dict[str, tuple[list[str], str]]:
    """{case: (mates arguments, the hostile file's description)}; files written under `tmp`."""
    from schemas import bounds

    def path(name: str) -> str:
        return os.path.join(tmp, name)

    def write(name: str, data: bytes) -> str:
        with open(path(name), "wb") as handle:
            handle.write(data)
        return path(name)

    micro = open(MICRO, "rb").read()
    run = ["--set", f"run={path('run')}", "--set", f"data={path('data')}"]
    budget = bounds.MAX_RECIPE_BYTES - len(micro) - 64
    items = budget // 3  # "1, " per scalar: as many nodes as fit under the size bound
    cases = {
        "recipe: billion laughs (10^30 scalars expanded)": write("laughs.yaml", micro + _laughs(30).encode()),
        "recipe: 1 MiB flat list (size bound, node bound)":
            write("flat.yaml", micro + b"variables: {x: [" + b"1, " * items + b"1]}\n"),
        "recipe: 1 MiB of nesting (depth bound)":
            write("deep.yaml", micro + b"variables: {x: " + b"[" * (budget // 2) + b"]" * (budget // 2) + b"}\n"),
    }
    with open(path("huge.yaml"), "wb") as handle:  # sparse: 8 GiB claimed, nothing read
        handle.truncate(8 << 30)
    cases["recipe: 8 GiB file (size bound)"] = path("huge.yaml")
    out = {name: (["run", file, *run], f"{os.path.getsize(file):,} bytes") for name, file in cases.items()}

    line = write("line.jsonl", b'{"text": "' + b"x" * (4 * bounds.MAX_LINE_BYTES))
    nested = write("nested.jsonl", b'{"text": "x", "m": ' + b"[" * (bounds.MAX_LINE_BYTES // 2 - 64)
                   + b"]" * (bounds.MAX_LINE_BYTES // 2 - 64) + b"}\n")
    footer = write("footer.parquet", b"PAR1" + b"\0" * 64 + (2 ** 32 - 1).to_bytes(4, "little") + b"PAR1")
    big_set = path("big-set.jsonl")
    with open(big_set, "wb") as handle:
        handle.truncate(8 << 30)
    deep_set = write("deep-set.jsonl", open(nested, "rb").read())
    small = write("small.jsonl", b"\n".join(json.dumps({"text": f"doc {i} " * 40}).encode() for i in range(20)))
    ingest = ["ingest", "--data", path("data"), "--input"]
    out.update({
        "record: a line 4x the line bound, no newline (line bound)": (ingest + [line], f"{os.path.getsize(line):,} bytes"),
        "record: a line just under the line bound, all nested arrays (depth bound)":
            (ingest + [nested], f"{os.path.getsize(nested):,} bytes"),
        "parquet: footer claiming 4 GiB (footer bound)": (ingest + [footer], f"{os.path.getsize(footer):,} bytes"),
        "set file: 8 GiB (size bound)": (ingest + [small, "--target", f"big={big_set}"], "8 GiB (sparse)"),
        "set file: the same nested record as a target set (depth bound)":
            (ingest + [small, "--target", f"deep={deep_set}"], f"{os.path.getsize(deep_set):,} bytes"),
    })
    return out


def _measure(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    wall = time.perf_counter() - started
    lines = proc.stderr.strip().splitlines()
    report = json.loads(lines[-1])
    errors = [line for line in lines if line.startswith("mates: error:")]
    return {**report, "wall_seconds": round(wall, 2), "seconds": round(report["seconds"], 2),
            "peak_mb": round(report["peak_mb"], 1), "error": errors[0][:160] if errors else None,
            "one_line": len(errors) == 1 and "Traceback" not in proc.stderr}


def bench_bounds(recipe=None, *, out=None, log=print) -> dict:
    """Every case of `_cases`, each in a fresh process; the baselines are the same commands
    refused at once for an unrelated reason (an unknown recipe key; a missing input file)."""
    results = {"load_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="mates-bench-bounds-", dir=out) as tmp:
        cases = _cases(tmp)
        bad_key = os.path.join(tmp, "bad-key.yaml")
        with open(bad_key, "wb") as handle:
            handle.write(open(MICRO, "rb").read() + b"no_such_key: 1\n")
        results["baseline: recipe refused (unknown key)"] = _measure(["run", bad_key])
        results["baseline: ingest refused (no input file)"] = _measure(
            ["ingest", "--data", os.path.join(tmp, "data"), "--input", os.path.join(tmp, "absent.jsonl")])
        for name, (args, size) in cases.items():
            log(f"bench bounds: {name} ({size})")
            results[name] = {**_measure(args), "input": size}
            if os.path.exists(os.path.join(tmp, "data", "_SUCCESS")):
                raise AssertionError(f"{name}: a pool was committed")
    return results
