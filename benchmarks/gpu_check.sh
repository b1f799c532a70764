#!/usr/bin/env bash
# One prepared check of the CUDA training path: the test suite, CUDA/CPU and bf16/fp32 parity,
# training in bf16, fp16 and fp32 with and without --compile, torchrun with NCCL, bench.py
# against the public recipe (fp32 as published and with bf16 added), the data loader against the
# training step, and model FLOP utilisation. One table on stdout, JSON and markdown in
# benchmarks/results/, exit status 1 if a check failed. Budget: under 8 minutes on one H200,
# set-up included; nothing is downloaded but Python packages.
#
#   benchmarks/gpu_check.sh                        # on the GPU machine, from a fresh clone
#   benchmarks/gpu_check.sh --device cpu --small   # the dry run (a few minutes on 2 CPU cores)
#   benchmarks/gpu_check.sh --steps 100            # shorter training runs
#
# Python: $PYTHON if set, else .venv/bin/python, else a new .venv with the README's packages
# (on Linux x86_64 PyPI's torch wheel is a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
        .venv/bin/pip install -q --no-deps clip-anytorch==2.6.0
    fi
    PYTHON=.venv/bin/python
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
