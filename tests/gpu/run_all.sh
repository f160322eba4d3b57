#!/usr/bin/env bash
# The GPU tests alone (tests/gpu: every support-table cell one GPU can test), through the one GPU
# entry point: versions first, results (JUnit XML, a table) kept in --out DIR or $OUT.
#     tests/gpu/run_all.sh --out DIR            PYTHON=/path/to/python tests/gpu/run_all.sh --out DIR
exec "$(dirname "${BASH_SOURCE[0]}")/run_on_gpu.sh" --only tests "$@"
