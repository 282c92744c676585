#!/usr/bin/env bash
# The GPU device check (issue 23): the gpu recipe for a few hundred steps plus one `mates`
# boundary; prints tokens/s, MFU, peak memory and the boundary's phases (jobs/device_check.py).
#   jobs/device_check.sh                 # every visible GPU (composer -n <count>)
#   STEPS=300 BATCH=64 jobs/device_check.sh
# Needs the pinned environment (`make install`); reaches no network (the demo corpus is packaged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "device check: no CUDA device visible" >&2; exit 2; fi
OUT=${OUT:-$(mktemp -d /tmp/mates-device-XXXX)}
ARGS=(--steps "${STEPS:-300}" --batch-size "${BATCH:-64}" --out "$OUT")
if [ "$GPUS" -gt 1 ]; then
  exec "$(dirname "$PY")/composer" -n "$GPUS" -m jobs.device_check "${ARGS[@]}"
fi
exec "$PY" -m jobs.device_check "${ARGS[@]}"
