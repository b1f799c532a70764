#!/usr/bin/env bash
# What demo.sh's Safe-CLIP settings buy: its Safe-CLIP step rerun with one choice changed at a time.
#
#   ./demo.sh && benchmarks/demo_settings.sh        # about 5 minutes on 2 CPU cores, after demo.sh
#
# Each setting fine-tunes demo.sh's toy CLIP on its data with the command demo.sh's Safe-CLIP step
# ran (its train_config.json, and its number of steps) plus the setting's flags, which win. Then
# evaluate.py compares them all with the demo's own run and the toy CLIP: runs/demo-settings/eval.json
# and eval.md, and a one-table summary, runs/demo-settings/summary.md, which
# `python scripts/refresh_readme.py` copies into docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO:-runs/demo}
OUT=${OUT:-runs/demo-settings}
PYTHON=${PYTHON:-python}
# name: flags. The text tower alone; the paper's InfoNCE scale; the paper's LoRA alpha; the paper's LoRA dropout.
SETTINGS=${SETTINGS:-"text-tower-only:--freeze vision
paper-scale-100:--nce-scale 100
paper-alpha-1:--lora-alpha 1
paper-dropout-0.1:--lora-dropout 0.1"}

[ -f "$DEMO/safeclip/train_config.json" ] || { echo "error: run ./demo.sh first (no $DEMO/safeclip)" >&2; exit 2; }
eval "RECIPE=($($PYTHON benchmarks/runs.py recipe "$DEMO/safeclip"))"
DATA=${RECIPE[1]} BASE=${RECIPE[3]}
mkdir -p "$OUT"
runs=()
while IFS=: read -r name flags; do
    rm -rf "${OUT:?}/$name"              # a re-run trains afresh, against the demo run it finds
    # shellcheck disable=SC2086          # the flags are words
    $PYTHON safeclip.py train "${RECIPE[@]}" $flags --out "$OUT/$name"
    runs+=("$name=$OUT/$name")
done <<< "$SETTINGS"

compare=()
for run in "${runs[@]}"; do compare+=(--compare "$run"); done
ZS=$(dirname "$DATA")/zeroshot
$PYTHON evaluate.py --ckpt "$DEMO/safeclip" "${compare[@]}" --baseline "$BASE" \
    --zeroshot "$ZS" --templates "$ZS/templates.txt" \
    --data "$DATA" --split test --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md"
$PYTHON benchmarks/runs.py summary "$OUT" "$OUT/eval.json" "${runs[@]}" "model=$DEMO/safeclip" \
    --label "baseline=toy CLIP" --label "model=demo.sh (both towers, --nce-scale model, --lora-alpha 4, --lora-dropout 0)"
