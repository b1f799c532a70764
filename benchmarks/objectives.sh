#!/usr/bin/env bash
# Safe-CLIP, SafeR-CLIP and twin-offset (ours) side by side on the offline demo's toy world.
#
#   benchmarks/objectives.sh        # about 12 minutes on 2 CPU cores, plus demo.sh's first time
#
# 1. demo.sh as it is (OUT=runs/objectives/demo): the toy world, the toy CLIP, its Safe-CLIP
#    fine-tuning and the demo's own table (kept for a second run: delete that folder to redo it);
# 2. safer-clip and twin-offset fine-tune the same toy CLIP with the command Safe-CLIP ran (its
#    train_config.json: data, seed, towers, batch, lr, schedule, LoRA, InfoNCE scale) and the same
#    number of steps; twin-offset once per offset in OFFSETS (the first is the one reported as
#    "twin-offset", the others are the settings tried beside it);
# 3. evaluate.py compares them all with the toy CLIP: runs/objectives/eval.json and eval.md, and
#    a one-table summary with each run's training speed, runs/objectives/summary.md, which
#    `python scripts/refresh_readme.py` copies into docs/objectives.md.
# Every demo.sh setting (N, SEED, ARCH, CLIP_EPOCHS, SAFECLIP_EPOCHS, FREEZE, PYTHON) passes through.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/objectives}
PYTHON=${PYTHON:-python}
OBJECTIVES=${OBJECTIVES:-safer-clip twin-offset}
OFFSETS=${OFFSETS:-1 2}                 # twin-offset's --offset a: the default first, then the others tried

[ -f "$OUT/demo/safeclip/train_config.json" ] || OUT="$OUT/demo" PYTHON="$PYTHON" ./demo.sh

eval "RECIPE=($($PYTHON benchmarks/runs.py recipe "$OUT/demo/safeclip"))"
DATA=${RECIPE[1]} BASE=${RECIPE[3]}      # the demo's data and toy CLIP
runs=("safeclip=$OUT/demo/safeclip")
for objective in $OBJECTIVES; do
    if [ "$objective" = twin-offset ]; then
        for a in $OFFSETS; do
            name=twin-offset; [ "$a" = "${OFFSETS%% *}" ] || name="twin-offset-a$a"
            rm -rf "${OUT:?}/$name"      # a re-run trains afresh, against the demo run it finds
            $PYTHON safeclip.py train --objective twin-offset "${RECIPE[@]}" --offset "$a" --out "$OUT/$name"
            [ "$name" = twin-offset ] || runs+=("$name=$OUT/$name")
        done
    else
        rm -rf "${OUT:?}/$objective"
        $PYTHON safeclip.py train --objective "$objective" "${RECIPE[@]}" --out "$OUT/$objective"
        runs+=("$objective=$OUT/$objective")
    fi
done

compare=()
for run in "${runs[@]}"; do compare+=(--compare "$run"); done
zeroshot=()                             # the demo's toy zero-shot set, where its data has one
ZS=$(dirname "$DATA")/zeroshot
[ -f "$ZS/templates.txt" ] && zeroshot=(--zeroshot "$ZS" --templates "$ZS/templates.txt")
$PYTHON evaluate.py --ckpt "$OUT/twin-offset" "${compare[@]}" --baseline "$BASE" "${zeroshot[@]}" \
    --data "$DATA" --split test --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md"

# One table: R@1, unsafe@1 and zero-shot top-1 (%), and training speed.
a=${OFFSETS%% *}
$PYTHON benchmarks/runs.py summary "$OUT" "$OUT/eval.json" "${runs[@]}" "model=$OUT/twin-offset" \
    --label "baseline=toy CLIP" --label "model=twin-offset (a=$a)"
