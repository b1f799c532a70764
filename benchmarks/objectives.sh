#!/usr/bin/env bash
# Safe-CLIP, SafeR-CLIP and twin-offset (ours) side by side on the offline demo's toy world.
#
#   benchmarks/objectives.sh        # about 12 minutes on 2 CPU cores
#
# 1. demo.sh as it is (OUT=runs/objectives/demo): the toy world, the toy CLIP, its Safe-CLIP
#    fine-tuning and the demo's own table (kept for a second run: delete that folder to redo it);
# 2. safer-clip and twin-offset fine-tune the same toy CLIP with the command Safe-CLIP ran (its
#    train_config.json: data, seed, towers, batch, lr, schedule) and the same number of steps;
# 3. evaluate.py compares the three with the toy CLIP: runs/objectives/eval.json and eval.md, and
#    a one-table summary with each run's training speed, runs/objectives/summary.md, which
#    `python scripts/refresh_readme.py` copies into the README.
# Every demo.sh setting (N, SEED, ARCH, CLIP_EPOCHS, SAFECLIP_EPOCHS, FREEZE, PYTHON) passes through.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/objectives}
PYTHON=${PYTHON:-python}
OBJECTIVES=${OBJECTIVES:-safer-clip twin-offset}

[ -f "$OUT/demo/safeclip/train_config.json" ] || OUT="$OUT/demo" PYTHON="$PYTHON" ./demo.sh

# The recipe Safe-CLIP ran, as recorded in its train_config.json, with its number of steps.
recipe() {
    $PYTHON - "$OUT/demo/safeclip" <<'EOF'
import json, shlex, sys
from pathlib import Path
run = Path(sys.argv[1])
config = json.loads((run / "train_config.json").read_text())
steps = sum("loss" in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines())
flags = ["--data", config["data"], "--model", config["model"], "--seed", config["seed"], "--batch-size",
         config["batch_size"], "--lr", config["lr"], "--schedule", config["schedule"], "--warmup", config["warmup"],
         "--weight-decay", config["weight_decay"], "--patience", config["patience"], "--steps", steps]
flags += ["--freeze", *config["freeze"]] if config["freeze"] else []
print(shlex.join(map(str, flags)))
EOF
}
eval "RECIPE=($(recipe))"
DATA=${RECIPE[1]} BASE=${RECIPE[3]}      # the demo's data and toy CLIP
for objective in $OBJECTIVES; do
    $PYTHON safeclip.py train --objective "$objective" "${RECIPE[@]}" --out "$OUT/$objective"
done

compare=(--compare "safeclip=$OUT/demo/safeclip")
for objective in $OBJECTIVES; do
    [ "$objective" = twin-offset ] || compare+=(--compare "$objective=$OUT/$objective")
done
zeroshot=()                             # the demo's toy zero-shot set, where its data has one
ZS=$(dirname "$DATA")/zeroshot
[ -f "$ZS/templates.txt" ] && zeroshot=(--zeroshot "$ZS" --templates "$ZS/templates.txt")
$PYTHON evaluate.py --ckpt "$OUT/twin-offset" "${compare[@]}" --baseline "$BASE" "${zeroshot[@]}" \
    --data "$DATA" --split test --no-cache --json "$OUT/eval.json" --markdown "$OUT/eval.md"

# One table: the settings the objectives differ on, R@1 and unsafe@1 (%), and training speed.
$PYTHON - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "eval.json").read_text())
runs = {"model": out / "twin-offset", "safeclip": out / "demo" / "safeclip"}
runs.update({name: out / name for name in report["models"] if name not in ("model", "baseline", "safeclip")})
names = {"baseline": "toy CLIP", "model": "twin-offset"}
R = ("T->V", "V->T", "T*->V", "V*->T")
U = ("T*->V+V*", "V*->T+T*", "T->V+V*", "V->T+T*")
zeroshot = bool(report["models"]["model"]["zeroshot"])
header = ["model", *(f"{k} R@1" for k in R), *(f"{k} unsafe@1" for k in U)] + (["zero-shot top-1"] if zeroshot else [])
header += ["train quadruplets/s"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for key in ["baseline", "safeclip", *(k for k in report["models"] if k not in ("model", "baseline", "safeclip")), "model"]:
    m = report["models"][key]
    cells = [f"{m['retrieval'][k]['R@1']:.1f}" for k in R] + [f"{m['unsafe_at_k'][k]['@1']:.1f}" for k in U]
    cells += [f"{m['zeroshot']['top1']:.1f}"] if zeroshot else []
    if key in runs:
        speeds = [json.loads(l)["samples_per_s"] for l in (runs[key] / "log.jsonl").read_text().splitlines() if "samples_per_s" in l]
        cells.append(f"{speeds[-1]:.1f}")
    else:
        cells.append("")
    lines.append("| " + " | ".join([names.get(key, key), *cells]) + " |")
text = f"{report['data']}, split {report['split']}: {report['models']['model']['n']} quadruplets\n\n" + "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
