#!/usr/bin/env bash
# Every benchmark of lightning-hrp on one CUDA GPU, in under 5 minutes, printing the reports:
#   1. benchmarks/svd.py       the engine's decomposition of the 224 LLaMA-7B layers at R = 64, r = 8 against
#                              its Gram floor (issue 15, goal 1), the QR route and dense and randomised SVDs,
#                              on Gaussian, preheat-like and steep factors (the dense SVDs on the Gaussian
#                              ones only: cuSOLVER's dense SVD of a 4096x11008 matrix can take seconds);
#   2. benchmarks/overhead.py  HRP's time and peak memory against the main training, on the matrix
#                              regression (400 main steps) and MiniLM Rotten Tomatoes (300) recipes,
#                              3 repeats;
#   3. benchmarks/overhead.py  the same for SmolLM2-135M math SFT (100 main steps, 2 repeats; the first run also
#                              dequantises the GGUF model into ~/.cache/lightning-hrp, untimed).
# Each step has its own time limit (80 + 95 + 105 s), so one that hangs or runs long still leaves the
# others' results; the exit status is that of the first step that failed.
#
# Usage (from anywhere):  benchmarks/gpu.sh            PYTHON=/path/to/python benchmarks/gpu.sh
# Needs a CUDA build of torch in that Python's environment and, for the overhead steps, the offline
# model/data packages (see DATA_PACKAGES in the Makefile); the scripts run as modules of this checkout
# (python -m benchmarks.svd), so lightning-hrp itself needs no install.
# Reports go to stdout and, as JSON, to $OUT_DIR (default: a new temporary folder, printed at the end).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"

"$PYTHON" - <<'PY' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu.sh needs a CUDA GPU; this Python has torch {torch.__version__} and sees none.")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU 0: {torch.cuda.get_device_name(0)}")
PY

STATUS=0
run_step() {  # run_step LIMIT_SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo
    echo "## $name (limit ${limit} s): $*"
    echo
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo
    echo "($name: exit status $status after $((SECONDS - started)) s$([[ $status == 124 || $status == 137 ]] && echo ', timed out'))"
    if [[ $STATUS == 0 && $status != 0 ]]; then STATUS=$status; fi
}

run_step 80 "Decomposition (benchmarks/svd.py)" \
    "$PYTHON" -m benchmarks.svd --device cuda --sets llama-7b --ranks 64 --tops 8 --factors gaussian preheat steep \
    --repeats 5 --budget-s 2 --json "$OUT_DIR/svd.json"

run_step 95 "Overhead and memory: matrix regression, classification (benchmarks/overhead.py)" \
    "$PYTHON" -m benchmarks.overhead --device cuda --recipes matrix_regression classification --repeats 3 \
    --json "$OUT_DIR/overhead.json"

run_step 105 "Overhead and memory: math SFT (benchmarks/overhead.py)" \
    "$PYTHON" -m benchmarks.overhead --device cuda --recipes math_sft --repeats 2 --json "$OUT_DIR/overhead_sft.json"

echo
echo "JSON reports in $OUT_DIR; exit status $STATUS"
exit $STATUS
