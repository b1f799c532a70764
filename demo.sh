#!/usr/bin/env bash
# The offline demo: Safe-CLIP end to end on a CPU, with nothing to download.
#
#   1. draw a toy world of safe/unsafe quadruplets, and a held-out zero-shot set (generate_data.py --toy)
#   2. pre-train a small CLIP on it from scratch, safe and unsafe pairs alike, with CLIP's own
#      objective, so that it links unsafe captions to unsafe images as the real CLIP does
#   3. fine-tune both of its towers with Safe-CLIP                (safeclip.py train; FREEZE=vision: text only)
#   4. compare the two on the test split and the zero-shot set, and draw what they retrieve (evaluate.py);
#      its console, which ends on a few lines saying what changed, is kept in $OUT/eval.txt
#
# Every size is an environment variable, so the test suite runs a smaller copy of this recipe and
# benchmarks/objectives.sh reuses its data and toy CLIP steps.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-runs/demo}
N=${N:-3000}                       # quadruplets (80% train, 10% val, 10% test)
SEED=${SEED:-0}
IMAGE_SIZE=${IMAGE_SIZE:-48}       # drawn at the model's resolution: 6x6 patches of 8 pixels
# 96 wide: 0.6x the time of 128 wide, with every figure of the demo's guard kept (docs/demo.md)
ARCH=${ARCH:-width=96,layers=4,embed_dim=128,image_resolution=$IMAGE_SIZE,vision_patch_size=8,context_length=40}
CLIP_EPOCHS=${CLIP_EPOCHS:-16}
CLIP_LR=${CLIP_LR:-2e-3}
SAFECLIP_EPOCHS=${SAFECLIP_EPOCHS:-5}
SAFECLIP_LR=${SAFECLIP_LR:-3e-3}
LORA_ALPHA=${LORA_ALPHA:-4}        # LoRA scale alpha/rank = 1/4: adapters on 128-wide layers need more say than on 1024-wide ones
LORA_DROPOUT=${LORA_DROPOUT:-0}    # the paper's 0.1 would draw a dropout mask per adapter: on a CPU half of a Safe-CLIP step (benchmarks/demo_step_profile.py)
NCE_SCALE=${NCE_SCALE:-model}      # the toy CLIP's own logit scale (~21), not the 100 that OpenAI's CLIPs learned
LAMBDAS=${LAMBDAS:-}               # empty: the paper's loss weights
FREEZE=${FREEZE-}                  # empty: both towers, as in the paper; "vision": the text tower only
PYTHON=${PYTHON:-python}

$PYTHON generate_data.py --toy "$N" --seed "$SEED" --image-size "$IMAGE_SIZE" --out "$OUT/data"

# A re-run trains both models afresh: `train` never overwrites a run on its own.
rm -rf "$OUT/clip" "$OUT/safeclip"

$PYTHON safeclip.py train --objective clip --scratch "$ARCH" --vocab-size 1000 \
    --data "$OUT/data/pairs.jsonl" --out "$OUT/clip" --seed "$SEED" \
    --epochs "$CLIP_EPOCHS" --batch-size 64 --lr "$CLIP_LR" --schedule cosine --warmup 40 --weight-decay 0.1 \
    --patience 0 --eval-every 1000000   # validated once, at the end: it only improves, and 15 validations cost 8 s

$PYTHON safeclip.py train --model "$OUT/clip" \
    --data "$OUT/data/pairs.jsonl" --out "$OUT/safeclip" --seed "$SEED" \
    --epochs "$SAFECLIP_EPOCHS" --batch-size 64 --lr "$SAFECLIP_LR" --patience 0 \
    --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" --nce-scale "$NCE_SCALE" \
    ${LAMBDAS:+--lambdas $LAMBDAS} ${FREEZE:+--freeze $FREEZE}

$PYTHON evaluate.py --ckpt "$OUT/safeclip" --baseline "$OUT/clip" --data "$OUT/data/pairs.jsonl" \
    --split test --zeroshot "$OUT/data/zeroshot" --templates "$OUT/data/zeroshot/templates.txt" \
    --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md" --figure "$OUT/retrieval.png" | tee "$OUT/eval.txt"
