#!/usr/bin/env bash
# Safe-CLIP, SafeR-CLIP, twin-offset and twin-margin (ours; twin-nce and twin-gap on request) side by
# side on the offline demo's toy world, on one budget, and Safe-CLIP once more with twice that budget.
#
#   benchmarks/objectives.sh                        # about 9 minutes on 2 CPU cores, plus demo.sh's 4 the first time
#   OBJECTIVES=twin-margin benchmarks/objectives.sh # any subset: the demo's Safe-CLIP and that objective
#
# 1. demo.sh as it is (OUT=runs/objectives/demo): the toy world, the toy CLIP, its Safe-CLIP
#    fine-tuning and the demo's own table (kept for a second run: delete that folder to redo it);
# 2. each objective in OBJECTIVES fine-tunes the same toy CLIP with the command Safe-CLIP ran (its
#    train_config.json: data, seed, towers, batch, lr, schedule, LoRA, InfoNCE scale) and the same
#    number of steps:
#      safer-clip    SafeR-CLIP;
#      twin-offset   once per offset in OFFSETS (the first is reported as "twin-offset", the others,
#                    tried beside it, as "twin-offset-aA");
#      twin-margin   with its defaults, or the flags in MARGIN_FLAGS (--margin, --margin-tau, --lambdas);
#      twin-nce      likewise (MARGIN_FLAGS too; opt in: not in the default list);
#      twin-gap      with its defaults, or the flags in GAP_FLAGS (--offset, --lambdas; opt in);
#      twin-gap-2x   twin-gap with twice the steps (GAP_FLAGS too; opt in);
#      safeclip-2x   Safe-CLIP itself with twice the steps: what more training alone buys;
# 3. evaluate.py compares them all with the demo's Safe-CLIP run and the toy CLIP: runs/objectives/
#    eval.json, where the toy CLIP is "baseline" and each run is under its name ("safeclip",
#    "safer-clip", "twin-offset", "twin-offset-a2", "twin-margin", "twin-nce", "twin-gap", "twin-gap-2x",
#    "safeclip-2x"), and eval.md (whose
#    "model" column, and its diff row, is the demo's Safe-CLIP); and a one-table summary with each
#    run's training speed, runs/objectives/summary.md, which `python scripts/refresh_readme.py`
#    copies into docs/objectives.md.
# Every demo.sh setting (N, SEED, ARCH, CLIP_EPOCHS, SAFECLIP_EPOCHS, FREEZE, PYTHON, ...) passes through.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/objectives}
PYTHON=${PYTHON:-python}
OBJECTIVES=${OBJECTIVES:-safer-clip twin-offset twin-margin safeclip-2x}
OFFSETS=${OFFSETS:-1 2}                 # twin-offset's --offset a: the default first, then the others tried
MARGIN_FLAGS=${MARGIN_FLAGS:-}          # twin-margin's (and twin-nce's) settings; empty: safeclip.py's defaults
GAP_FLAGS=${GAP_FLAGS:-}                # twin-gap's settings; empty: safeclip.py's defaults

for objective in $OBJECTIVES; do
    case $objective in
        safer-clip|twin-offset|twin-margin|twin-nce|twin-gap|twin-gap-2x|safeclip-2x) ;;
        *) echo "error: OBJECTIVES: unknown objective '$objective' (safer-clip, twin-offset, twin-margin, twin-nce," \
                "twin-gap, twin-gap-2x, safeclip-2x; the demo's Safe-CLIP run is always compared)" >&2; exit 2 ;;
    esac
done

[ -f "$OUT/demo/safeclip/train_config.json" ] || OUT="$OUT/demo" PYTHON="$PYTHON" ./demo.sh

eval "RECIPE=($($PYTHON benchmarks/runs.py recipe "$OUT/demo/safeclip"))"
DATA=${RECIPE[1]} BASE=${RECIPE[3]}      # the demo's data and toy CLIP
STEPS=$($PYTHON benchmarks/runs.py steps "$OUT/demo/safeclip")
runs=("safeclip=$OUT/demo/safeclip")
labels=(--label "baseline=toy CLIP")
train() {                                # NAME FLAGS..: a fresh run against the demo run it finds
    local name=$1; shift
    rm -rf "${OUT:?}/$name"
    $PYTHON safeclip.py train "${RECIPE[@]}" "$@" --out "$OUT/$name"
    runs+=("$name=$OUT/$name")
}
for objective in $OBJECTIVES; do
    case $objective in
        twin-offset)
            for a in $OFFSETS; do
                if [ "$a" = "${OFFSETS%% *}" ]; then
                    train twin-offset --objective twin-offset --offset "$a"
                    labels+=(--label "twin-offset=twin-offset (a=$a)")
                else
                    train "twin-offset-a$a" --objective twin-offset --offset "$a"
                fi
            done ;;
        twin-margin|twin-nce)
            # shellcheck disable=SC2086   # the flags are words
            train "$objective" --objective "$objective" $MARGIN_FLAGS
            [ -z "$MARGIN_FLAGS" ] || labels+=(--label "$objective=$objective ($MARGIN_FLAGS)") ;;
        twin-gap)
            # shellcheck disable=SC2086   # the flags are words
            train twin-gap --objective twin-gap $GAP_FLAGS
            [ -z "$GAP_FLAGS" ] || labels+=(--label "twin-gap=twin-gap ($GAP_FLAGS)") ;;
        twin-gap-2x)
            # shellcheck disable=SC2086   # the flags are words
            train twin-gap-2x --objective twin-gap --steps $((2 * STEPS)) $GAP_FLAGS
            labels+=(--label "twin-gap-2x=twin-gap, 2x steps${GAP_FLAGS:+ ($GAP_FLAGS)}") ;;
        safeclip-2x)
            train safeclip-2x --objective safeclip --steps $((2 * STEPS))
            labels+=(--label "safeclip-2x=safeclip, 2x steps") ;;
        *)
            train "$objective" --objective "$objective" ;;
    esac
done

compare=()
for run in "${runs[@]:1}"; do compare+=(--compare "$run"); done
zeroshot=()                             # the demo's toy zero-shot set, where its data has one
ZS=$(dirname "$DATA")/zeroshot
[ -f "$ZS/templates.txt" ] && zeroshot=(--zeroshot "$ZS" --templates "$ZS/templates.txt")
$PYTHON evaluate.py --ckpt "$OUT/demo/safeclip" "${compare[@]}" --baseline "$BASE" "${zeroshot[@]}" \
    --data "$DATA" --split test --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md"
$PYTHON benchmarks/runs.py name "$OUT/eval.json" safeclip   # evaluate.py's "model" is the demo's Safe-CLIP

# One table: R@1, unsafe@1 and zero-shot top-1 (%), and training speed.
$PYTHON benchmarks/runs.py summary "$OUT" "$OUT/eval.json" "${runs[@]}" "${labels[@]}"
