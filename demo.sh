#!/usr/bin/env bash
# The offline demo: Safe-CLIP end to end on a CPU, with nothing to download.
#
#   1. draw a toy world of safe/unsafe quadruplets          (generate_data.py --toy)
#   2. pre-train a small CLIP on it from scratch, safe and unsafe pairs alike, with CLIP's own
#      objective, so that it links unsafe captions to unsafe images as the real CLIP does
#   3. fine-tune that CLIP's text tower with Safe-CLIP       (safeclip.py train; FREEZE= for both towers)
#   4. compare the two on the test split                     (evaluate.py)
#
# Every size is an environment variable, so the test suite runs a smaller copy of this recipe.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-runs/demo}
N=${N:-3000}                       # quadruplets (80% train, 10% val, 10% test)
SEED=${SEED:-0}
ARCH=${ARCH:-width=128,layers=4,embed_dim=128,image_resolution=32,vision_patch_size=8,context_length=40}
CLIP_EPOCHS=${CLIP_EPOCHS:-16}
SAFECLIP_EPOCHS=${SAFECLIP_EPOCHS:-6}
FREEZE=${FREEZE-vision}            # the toy's 4x4-patch images: see the README
PYTHON=${PYTHON:-python}

$PYTHON generate_data.py --toy "$N" --seed "$SEED" --out "$OUT/data"

$PYTHON safeclip.py train --objective clip --scratch "$ARCH" --vocab-size 1000 \
    --data "$OUT/data/pairs.jsonl" --out "$OUT/clip" --seed "$SEED" \
    --epochs "$CLIP_EPOCHS" --batch-size 64 --lr 2e-3 --schedule cosine --warmup 40 --weight-decay 0.1 \
    --patience 0

$PYTHON safeclip.py train --model "$OUT/clip" \
    --data "$OUT/data/pairs.jsonl" --out "$OUT/safeclip" --seed "$SEED" \
    --epochs "$SAFECLIP_EPOCHS" --batch-size 64 --lr 2e-3 --patience 0 ${FREEZE:+--freeze $FREEZE}

$PYTHON evaluate.py --ckpt "$OUT/safeclip" --baseline "$OUT/clip" --data "$OUT/data/pairs.jsonl" \
    --split test --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md"
