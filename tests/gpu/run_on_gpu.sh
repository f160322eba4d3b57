#!/usr/bin/env bash
# Every GPU check of lightning-hrp in one go, in under 9 minutes: the support table's GPU cells
# (tests/gpu), the CUDA benchmarks (decomposition, HRP's overhead) and a MiniLM / Rotten Tomatoes
# comparison at GPU scale; results land in $OUT step by step, then a pass/fail table.
# See tests/gpu/run_on_gpu.py for the steps, their time caps and the files left in $OUT.
#
# On the project's GPU machine (README, "GPU checks"), from the repository root, with .gpu_payload
# filled here first by `python tools/gpu_payload.py pack` and carried along:
#     bash tests/gpu/run_on_gpu.sh
# Elsewhere:  bash tests/gpu/run_on_gpu.sh --out DIR [--only tests svd overhead compare] [--rehearse] [--help]
#
# Uses the machine's own python3 (PYTHON=... to choose another), never a virtual environment of the
# checkout: the project is imported from this checkout, nothing is installed except, into a scratch
# folder, the payload's wheels of packages that Python lacks.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tests/gpu/run_on_gpu.py "$@"
