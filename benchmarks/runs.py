"""Helpers of the side-by-side scripts (objectives.sh, demo_settings.sh), which fine-tune the demo's
toy CLIP several ways on one budget and compare the results.

    python benchmarks/runs.py recipe RUN
        the training flags RUN was trained with (its train_config.json: data, base model, seed, batch,
        lr, schedule, LoRA, InfoNCE scale, towers) and its number of steps, shell-quoted on one line;
        later flags on a command line override these

    python benchmarks/runs.py summary OUT EVAL.json NAME=RUN [NAME=RUN ...] [--label KEY=TEXT ...]
        one markdown table from evaluate.py's JSON: R@1 and unsafe@1 (%), zero-shot top-1 where
        measured, and each run's training speed; written to OUT/summary.md and printed
"""

import argparse
import json
import os
import shlex
from pathlib import Path

R = ("T->V", "V->T", "T*->V", "V*->T")
U = ("T*->V+V*", "V*->T+T*", "T->V+V*", "V->T+T*")


def log_records(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def recipe(run):
    config = json.loads((Path(run) / "train_config.json").read_text())
    steps = sum("loss" in r for r in log_records(run))
    flags = ["--data", config["data"], "--model", config["model"], "--seed", config["seed"],
             "--batch-size", config["batch_size"], "--lr", config["lr"], "--schedule", config["schedule"],
             "--warmup", config["warmup"], "--weight-decay", config["weight_decay"], "--patience", config["patience"],
             "--steps", steps, "--lora-rank", config["lora_rank"], "--lora-alpha", config["lora_alpha"]]
    flags += ["--nce-scale", config["nce_scale"]] if config.get("nce_scale") else []
    flags += ["--freeze", *config["freeze"]] if config["freeze"] else []
    return shlex.join(map(str, flags))


def summary(out, report_path, runs, labels):
    report = json.loads(Path(report_path).read_text())
    models = report["models"]
    zeroshot = all(m.get("zeroshot") for m in models.values())
    header = ["model", *(f"{k} R@1" for k in R), *(f"{k} unsafe@1" for k in U)]
    header += ["zero-shot top-1"] if zeroshot else []
    header += ["train quadruplets/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in ["baseline", *(k for k in models if k not in ("baseline", "model")), "model"]:  # the chosen one last
        m = models[key]
        cells = [f"{m['retrieval'][k]['R@1']:.1f}" for k in R] + [f"{m['unsafe_at_k'][k]['@1']:.1f}" for k in U]
        cells += [f"{m['zeroshot']['top1']:.1f}"] if zeroshot else []
        speeds = [r["samples_per_s"] for r in log_records(runs[key]) if "samples_per_s" in r] if key in runs else []
        cells.append(f"{speeds[-1]:.1f}" if speeds else "")
        lines.append("| " + " | ".join([labels.get(key, key), *cells]) + " |")
    data = os.path.relpath(report["data"])  # as the scripts name it, from the repository
    text = (f"{data if not data.startswith('..') else report['data']}, split {report['split']}: "
            f"{models['baseline']['n']} quadruplets\n\n"
            + "\n".join(lines) + "\n")
    tmp = Path(out) / ".summary.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(out) / "summary.md")
    print(text)


def pairs(items):
    return dict(item.split("=", 1) for item in items or ())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipe").add_argument("run")
    s = sub.add_parser("summary")
    s.add_argument("out")
    s.add_argument("report")
    s.add_argument("runs", nargs="+", metavar="NAME=RUN")
    s.add_argument("--label", action="append", metavar="KEY=TEXT")
    args = parser.parse_args(argv)
    if args.command == "recipe":
        print(recipe(args.run))
    else:
        summary(args.out, args.report, pairs(args.runs), pairs(args.label))


if __name__ == "__main__":
    main()
