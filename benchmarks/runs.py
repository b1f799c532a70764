"""Helpers of the side-by-side scripts (objectives.sh, demo_settings.sh), which fine-tune the demo's
toy CLIP several ways on one budget and compare the results.

    python benchmarks/runs.py recipe RUN
        the training flags RUN was trained with (its train_config.json: data, base model, seed, batch,
        lr, schedule, LoRA, InfoNCE scale, towers) and its number of steps, shell-quoted on one line;
        later flags on a command line override these

    python benchmarks/runs.py steps RUN
        RUN's number of optimizer steps

    python benchmarks/runs.py name EVAL.json NAME
        renames evaluate.py's "model" (its --ckpt) to NAME in EVAL.json, in place and in its place

    python benchmarks/runs.py summary OUT EVAL.json NAME=RUN [NAME=RUN ...] [--label KEY=TEXT ...]
        one markdown table from evaluate.py's JSON: R@1 and unsafe@1 (%), zero-shot top-1 where
        measured, and each run's training speed (and, where one run is NAME "safeclip", each
        run's time per step, a step's rows over its speed, as a multiple of that one's); the toy
        CLIP ("baseline") first, then the models in the report's order, "model" (the chosen one)
        last; written to OUT/summary.md and printed
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


def steps(run):
    return sum("loss" in r for r in log_records(run))


def recipe(run):
    config = json.loads((Path(run) / "train_config.json").read_text())
    flags = ["--data", config["data"], "--model", config["model"], "--seed", config["seed"],
             "--batch-size", config["batch_size"], "--lr", config["lr"], "--schedule", config["schedule"],
             "--warmup", config["warmup"], "--weight-decay", config["weight_decay"], "--patience", config["patience"],
             "--steps", steps(run), "--lora-rank", config["lora_rank"], "--lora-alpha", config["lora_alpha"],
             "--lora-dropout", config["lora_dropout"]]
    flags += ["--nce-scale", config["nce_scale"]] if config.get("nce_scale") else []
    flags += ["--freeze", *config["freeze"]] if config["freeze"] else []
    return shlex.join(map(str, flags))


def speed(run):
    """Quadruplets per second over the whole run (the last log record's running figure), or None."""
    speeds = [r["samples_per_s"] for r in log_records(run) if "samples_per_s" in r]
    return speeds[-1] if speeds else None


def step_rows(run):
    """Quadruplets per optimizer step: --batch-size x --accum."""
    config = json.loads((Path(run) / "train_config.json").read_text())
    return config["batch_size"] * config.get("accum", 1)


def write_atomic(path, text):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def name(report_path, new):
    """evaluate.py's "model" -> NEW, keeping the report's order."""
    report = json.loads(Path(report_path).read_text())
    if new in report["models"]:
        raise SystemExit(f"error: {report_path} already has a model named {new!r}")
    report["models"] = {(new if k == "model" else k): v for k, v in report["models"].items()}
    write_atomic(report_path, json.dumps(report, indent=1) + "\n")


def summary(out, report_path, runs, labels):
    report = json.loads(Path(report_path).read_text())
    models = report["models"]
    zeroshot = all(m.get("zeroshot") for m in models.values())
    speeds = {key: speed(run) for key, run in runs.items()}
    step_times = {key: step_rows(run) / speeds[key] if speeds[key] else None  # (runs may differ in --batch-size)
                  for key, run in runs.items()}
    relative = step_times.get("safeclip") is not None
    header = ["model", *(f"{k} R@1" for k in R), *(f"{k} unsafe@1" for k in U)]
    header += ["zero-shot top-1"] if zeroshot else []
    header += ["train quadruplets/s"] + (["time/step (x safeclip)"] if relative else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ["baseline", *(k for k in models if k not in ("baseline", "model")), *(["model"] if "model" in models else [])]
    for key in order:  # the toy CLIP first, the chosen one ("model", where there is one) last
        m = models[key]
        cells = [f"{m['retrieval'][k]['R@1']:.1f}" for k in R] + [f"{m['unsafe_at_k'][k]['@1']:.1f}" for k in U]
        cells += [f"{m['zeroshot']['top1']:.1f}"] if zeroshot else []
        cells.append(f"{speeds[key]:.1f}" if speeds.get(key) else "")
        if relative:
            cells.append(f"{step_times[key] / step_times['safeclip']:.2f}" if step_times.get(key) else "")
        lines.append("| " + " | ".join([labels.get(key, key), *cells]) + " |")
    data = os.path.relpath(report["data"])  # as the scripts name it, from the repository
    text = (f"{data if not data.startswith('..') else report['data']}, split {report['split']}: "
            f"{models['baseline']['n']} quadruplets\n\n"
            + "\n".join(lines) + "\n")
    write_atomic(Path(out) / "summary.md", text)
    print(text)


def pairs(items):
    return dict(item.split("=", 1) for item in items or ())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipe").add_argument("run")
    sub.add_parser("steps").add_argument("run")
    n = sub.add_parser("name")
    n.add_argument("report")
    n.add_argument("name")
    s = sub.add_parser("summary")
    s.add_argument("out")
    s.add_argument("report")
    s.add_argument("runs", nargs="+", metavar="NAME=RUN")
    s.add_argument("--label", action="append", metavar="KEY=TEXT")
    args = parser.parse_args(argv)
    if args.command == "recipe":
        print(recipe(args.run))
    elif args.command == "steps":
        print(steps(args.run))
    elif args.command == "name":
        name(args.report, args.name)
    else:
        summary(args.out, args.report, pairs(args.runs), pairs(args.label))


if __name__ == "__main__":
    main()
