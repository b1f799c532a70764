#!/usr/bin/env bash
# One prepared check of the CUDA training path: CUDA/CPU and bf16/fp32 parity, training in bf16,
# fp16 and fp32 with and without --compile, torchrun with NCCL, bench.py against the public recipe
# (fp32 as published and with bf16 added) with model FLOP utilisation from the training loop, the
# data loader against the training step, and the CPU test suite. Each part has a time budget,
# printed as it starts; the whole fits in 8 minutes on one H200 (--budget, 450 s). One table on
# stdout; JSON and markdown in --results (default $OUT when set, else benchmarks/results/),
# rewritten after each part. Exit status 1 if a check failed; 3 if a headline check (bench.py's
# speed ratios, model FLOP utilisation, peak memory) could not run, unless --allow-skips.
# Nothing is downloaded, except by --download-wheels.
#
#   benchmarks/gpu_check.sh --download-wheels      # where there is a network: benchmarks/wheels/ for the GPU machine
#   benchmarks/gpu_check.sh                        # on the GPU machine, as it is (with benchmarks/wheels/)
#   benchmarks/gpu_check.sh --device cpu --small   # the dry run (a minute or two on 2 CPU cores)
#   benchmarks/gpu_check.sh --only bench loader    # some parts (the names are in --help)
#   benchmarks/gpu_check.sh --setup ...            # first make .venv with the README's packages (network)
#
# Python: $PYTHON if set; else python3 if its torch sees a GPU (then nothing is installed); else
# .venv/bin/python. Packages that Python lacks travel as wheels in benchmarks/wheels/, unpacked
# for the run, not installed; without them the parts that need them are skipped with a note
# (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
setup=0
for a in "$@"; do
    if [ "$a" = --setup ]; then setup=1; else args+=("$a"); fi
done
if [ "$setup" = 1 ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
    .venv/bin/pip install -q --no-deps clip-anytorch==2.6.0
    PYTHON=.venv/bin/python
fi

if [ -n "${PYTHON:-}" ]; then
    why='$PYTHON'
elif python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=python3 why='its torch sees a GPU'
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python why='.venv'
else
    echo "gpu_check.sh: no Python to run with: \$PYTHON is not set, python3 has no torch that sees a GPU," \
         "and there is no .venv. Set PYTHON=/path/to/python, or add --setup to make .venv (needs a network)." >&2
    exit 2
fi
echo "gpu_check.sh: $PYTHON ($why)" >&2
exec "$PYTHON" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
