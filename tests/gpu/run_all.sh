#!/usr/bin/env bash
# Every GPU check of lightning-hrp in one go, on one or two CUDA GPUs, in well under 5 minutes:
# HRP under DDP, FSDP1 (strategy="fsdp", use_orig_params True and False) and ModelParallelStrategy
# (FSDP2), with 32-true, bf16-mixed and 16-mixed; then a compact pass/fail table.
#
# Usage (from anywhere):  tests/gpu/run_all.sh            PYTHON=/path/to/python tests/gpu/run_all.sh
# Needs a CUDA build of torch in that Python's environment, with lightning-hrp installed (pip install -e .[dev]).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
REPORT_DIR="$(mktemp -d)"
trap 'rm -rf "$REPORT_DIR"' EXIT

"$PYTHON" - <<'PY' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"run_all.sh needs a CUDA GPU; this Python has torch {torch.__version__} and sees none.")
names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {names}")
PY

# `-m gpu` overrides the default `-m 'not slow and not gpu'` from pyproject.toml; 280 s keeps the whole
# run under 5 minutes even if something hangs (collectives themselves time out after 90 s).
timeout --kill-after=10 280 "$PYTHON" -m pytest tests/gpu -m gpu -q -rfEsx -p no:cacheprovider \
    --junitxml="$REPORT_DIR/gpu.xml" -o junit_family=xunit1
STATUS=$?

"$PYTHON" - "$REPORT_DIR/gpu.xml" "$STATUS" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

report, status = Path(sys.argv[1]), int(sys.argv[2])
if not report.exists():
    print(f"\nno test report: pytest exited with {status}" + (" (timed out)" if status == 124 else ""))
    raise SystemExit
rows = []
for case in ET.parse(report).getroot().iter("testcase"):
    outcome = "PASS"
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "FAIL"
        elif child.tag == "skipped":
            outcome = "XFAIL" if child.get("type") == "pytest.xfail" else "SKIP"
    rows.append((case.get("name"), outcome, float(case.get("time", 0))))
width = max(len(name) for name, _, _ in rows) if rows else 10
print(f"\n{'check':<{width}}  result  seconds")
for name, outcome, seconds in rows:
    print(f"{name:<{width}}  {outcome:<6}  {seconds:7.1f}")
failed = sum(outcome == "FAIL" for _, outcome, _ in rows)
print(f"\n{len(rows) - failed}/{len(rows)} not failed; pytest exit status {status}")
PY
exit $STATUS
