#!/usr/bin/env bash
# One call for a lent GPU (bench/gpu_check.py says what it runs): from the repository root,
#   OUT=/some/dir bash bench/gpu_check.sh          # a GPU machine: torch + Triton, no network
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh   # the same stages on a CPU (interpreter, small)
# Writes $OUT/gpu_check.json (default bench/out/gpu_check/) and prints a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter that has torch: $GPU_CHECK_PYTHON, else python3, else python.
PY=""
for cand in "${GPU_CHECK_PYTHON:-}" python3 python; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
        PY="$cand"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no python with torch found (set GPU_CHECK_PYTHON); running with python3 to record it" >&2
    PY=python3
fi
exec "$PY" bench/gpu_check.py run
