#!/usr/bin/env bash
# The CUDA benchmarks alone (benchmarks/svd.py on the 224 LLaMA-7B layers; benchmarks/overhead.py on
# matrix regression and MiniLM-L6), through the one GPU entry point, tests/gpu/run_on_gpu.sh: each
# step with its own time cap, reports and JSON kept in --out DIR or $OUT as each step ends.
# MiniLM comes from the payload folder (python tools/gpu_payload.py pack; without it that step is skipped).
#     benchmarks/gpu.sh --out DIR            PYTHON=/path/to/python benchmarks/gpu.sh --out DIR
exec "$(dirname "${BASH_SOURCE[0]}")/../tests/gpu/run_on_gpu.sh" --only svd overhead "$@"
