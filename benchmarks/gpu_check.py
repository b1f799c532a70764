#!/usr/bin/env python
"""Every check of the CUDA training path in one run, one table (run it through gpu_check.sh).

On a GPU (the default, --device cuda, ViT-L/14 sizes, random weights, drawn data) it runs these
parts in this order, the most telling first. Each has a time budget, printed as it starts; a part
that overruns it is cut ("cut (budget N s)"), what it measured until then is kept, and the next
part starts. The whole run stays within --budget (450 s: the check gets one command of at most
10 minutes and must finish in 8); a part that no longer fits is skipped.
  set-up        drawn quadruplets at COCO's size and random weights;
  parity        CUDA vs CPU in float32 (max relative difference <= 1e-4, TF32 off) and bf16
                autocast vs float32 on CUDA (lowest cosine >= 0.999), both towers;
  train bf16    --steps steps: finite losses that fall; the loop's steady quadruplets/s (see
                `steady_state`) and model FLOP utilisation, the whole loop's and run's beside them;
  bench.py      --model L/14 --dtype bf16 --only train, 64 steps a side: ours against the public
                recipe in float32 as published and with bf16 autocast added, training loop alone
                (the whole run beside it); peak memory; model FLOP utilisation of the bf16 peak
                over ours' steady steps (the whole loop and the whole run beside it);
  data loader   images/s of the training data loader with 1, 2, 4 and 8 workers on photo-like
                JPEGs at COCO's size, against what the training step consumes;
  then         train fp32 (a quarter of the steps: no TF32); torchrun --nproc_per_node=1 (NCCL)
                against the plain fp32 run; train bf16 --compile (losses close to eager ones);
                train fp16 (few skipped steps); fp16 and fp32 with --compile;
  test suite    the CPU suite with CUDA_VISIBLE_DEVICES="", as CI runs it, in the time left.
After every part the table is written as JSON and markdown under --results ($OUT when set, as on
the device machine, whose $OUT comes back; else benchmarks/results/), so a run cut short still
leaves what it measured. Exit status: 1 if a check failed; 3 if a headline check (bench.py's speed
ratios, model FLOP utilisation, peak memory) could not run, whether skipped, cut or not judged
(no known peak for this GPU), unless --allow-skips; else 0. Cut and skipped parts are listed.

A part that needs a package this Python lacks is skipped with a note; nothing is installed. Wheels
in --wheels (default benchmarks/wheels/) are unpacked into the run's temporary folder and put first
on the path. `gpu_check.sh --download-wheels`, where there is a network, puts there the wheels of
what the GPU machine lacks (WHEELS): clip-anytorch brings OpenAI's vocabulary, which
bench.py needs; ftfy, wcwidth and diffusers the test suite. Without clip-anytorch the other parts
tokenize with a BPE trained on the drawn captions.

`--device cpu --small` runs the same script on a tiny model in a minute or two (a dry run for CI):
the GPU-only targets are reported, not enforced, and the --compile parts are left to
tests/test_precision.py, which compiles on the CPU.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  (drawn data, sizes, FLOP counts)
import safeclip  # noqa: E402

# The targets the issue set for a GPU run (ViT-L/14 sizes, bf16): the headline checks, all from
# bench.py. A run that asked for bench.py and could not judge one of them exits 3 (see main).
TARGETS = dict(vs_recipe_fp32=3.0, vs_recipe_bf16=1.5, mfu=0.40, peak_memory=0.8)
HEADLINES = dict(vs_recipe_fp32="speed vs the recipe in fp32", vs_recipe_bf16="speed vs the recipe with bf16",
                 mfu="model FLOP utilisation", peak_memory="peak memory vs the recipe's")
JUDGED = ("pass", "FAIL", "n/a (cpu)")  # a dry run judges nothing, but it ran the check

# Import name -> package, for what each part needs beyond torch and the runtime requirements.
PACKAGES = {"clip": "clip-anytorch", "ftfy": "ftfy", "wcwidth": "wcwidth", "regex": "regex", "diffusers": "diffusers",
            "transformers": "transformers", "peft": "peft", "pytest": "pytest"}
BENCH_NEEDS = ("clip", "transformers", "peft")
SUITE_NEEDS = tuple(PACKAGES)
# What --download-wheels fetches: the packages above that the GPU machine lacks (it has torch,
# transformers, peft, regex and pytest), for its platform, Linux x86-64, whatever the platform of
# the machine that downloads them. Each is pure Python or built for CPython's stable ABI, so it
# serves the GPU machine's Python 3.x; --no-deps, as clip-anytorch's torchvision pin is not needed.
WHEELS = ("clip-anytorch==2.6.0", "ftfy", "wcwidth", "diffusers")
WHEEL_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Content words for captions when OpenAI's vocabulary (in clip-anytorch) is absent.
PLAIN_WORDS = ("man", "woman", "child", "dog", "cat", "horse", "street", "table", "kitchen", "car", "bus", "train",
               "bike", "park", "beach", "field", "room", "window", "tree", "plate", "pizza", "cake", "phone", "bed",
               "sign", "boat", "water", "snow", "grass", "road", "people", "group", "bench", "wall", "food", "ball")


class Cut(BaseException):
    """A part ran out of its budget (a BaseException, so no `except Exception` on the way swallows it)."""


# ---------------------------------------------------------------------------------------------
# Rows, parts and their budgets
# ---------------------------------------------------------------------------------------------


class Checks:
    """The run's table: rows of (part, check, result, target, status, seconds), status one of
    pass, FAIL, info, n/a (cpu), skipped, cut (budget N s); rewritten to --results after each part.
    A headline row names its key in TARGETS; a row may carry its numbers as `values` (JSON only)."""

    def __init__(self, args, info):
        self.args, self.info, self.rows = args, info, []
        self.gpu = args.device.startswith("cuda")
        self.part, self.partial, self.started = None, None, time.perf_counter()
        self.deadline = self.started + args.budget

    def add(self, check, result, target="", ok=None, seconds=None, gpu_only=False, status=None, headline=None,
            values=None):
        status = status or ("info" if ok is None else "pass" if ok else "FAIL")
        if gpu_only and not self.gpu and status in ("pass", "FAIL", "info"):  # a dry run: not enforced
            status = "n/a (cpu)"
        self.rows.append(dict(part=self.part, check=check, result=result, target=target, status=status,
                              seconds=None if seconds is None else round(seconds, 1), headline=headline,
                              **({"values": values} if values else {})))
        print(f"[{status}] {check}: {result}" + (f" (target {target})" if target else ""), flush=True)

    def run(self, index, total, name, budget, fn):
        """Run one part within min(budget, the time left). A failure becomes a FAIL row, a cut a
        row with what the part had measured (its `partial`); either way the next part runs."""
        self.part, self.partial = name, None
        budget = int(min(budget, self.deadline - time.perf_counter()))
        if budget < 1:
            self.add(name, f"not started: the --budget of {self.args.budget} s is spent", status="skipped")
            return self.write()
        print(f"\n[part {index}/{total}] {name} ... budget {budget} s", flush=True)
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            try:
                fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Cut:
            try:
                done = self.partial() if self.partial else None
            except Exception as e:  # what was measured could not be read: say so, and go on
                done = f"(its results could not be read: {e})"
            self.add(name, f"cut after {time.perf_counter() - start:.0f} s" + (f": {done}" if done else ""),
                     status=f"cut (budget {budget} s)", seconds=time.perf_counter() - start)
        except Exception as e:  # a part's failure is a result to report, not the end of the run
            traceback.print_exc()
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            self.add(name, f"error: {message}", ok=False, seconds=time.perf_counter() - start)
        self.write()

    def skip(self, name, reason):
        self.part = name
        self.add(name, reason, status="skipped")
        self.write()

    def write(self, complete=False):
        """The table so far, as JSON and markdown, each replaced atomically."""
        self.info["seconds"] = round(time.perf_counter() - self.started, 1)
        self.info["complete"] = complete
        folder, tag = Path(self.args.results), self.args.tag
        bench.atomic_write(folder / f"gpu_check-{tag}.md", render(self.rows, self.info))
        bench.atomic_write(folder / f"gpu_check-{tag}.json",
                           json.dumps(dict(info=self.info, checks=self.rows), indent=2) + "\n")

    def with_status(self, *prefixes):
        return [r for r in self.rows if r["status"].startswith(prefixes)]

    def headlines_not_run(self):
        """The headline checks (TARGETS) that no row judged, with what the bench.py part said
        instead: skipped for a missing package, cut, failed to run, or no peak for this GPU."""
        judged = {r["headline"] for r in self.rows if r["headline"] and r["status"] in JUDGED}
        lacking = [HEADLINES[key] for key in TARGETS if key not in judged]
        said = [f"{r['check']}: {r['status']}: {r['result']}" for r in self.rows
                if r["part"] == BENCH_TITLE and not (r["headline"] and r["status"] in JUDGED)]
        return lacking, said


def _alarm(signum, frame):
    raise Cut


def render(rows, info):
    state = "" if info["complete"] else " (incomplete: a part is still running or the run was stopped)"
    lines = [f"GPU check: {info['device']}; python {info['python']}; torch {info['torch']}; model {info['model']} "
             f"sizes, random weights; {info['date']}; {info['seconds']:.0f} s in all{state}.", "",
             "| check | result | target | status | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['result']} | {r['target']} | {r['status']} | "
                     f"{'' if r['seconds'] is None else r['seconds']} |")
    return "\n".join(lines) + "\n"


def sh(cmd, env=None):
    """Run a command in its own process group, so a cut (or Ctrl-C) ends it with all its children
    (DataLoader workers, torchrun's ranks, bench.py's runs). Echoes its tail when it fails."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        print(f"$ {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}", file=sys.stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc):
    """SIGTERM first (a training run stops cleanly), then SIGKILL for whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def last_line(text):
    return text.strip().splitlines()[-1] if text.strip() else ""


def missing(modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def packages(modules):
    return ", ".join(PACKAGES.get(m, m) for m in modules)


# ---------------------------------------------------------------------------------------------
# Set-up: packages, data, weights
# ---------------------------------------------------------------------------------------------


def unpack_wheels(folder, into):
    """Unpack each wheel in `folder` whose modules this Python lacks into `into` and put `into`
    first on the path, of this process and of every command it runs. Nothing is installed."""
    unpacked = []
    for wheel in sorted(Path(folder).glob("*.whl")) if Path(folder).is_dir() else []:
        with zipfile.ZipFile(wheel) as z:
            tops = {name.split("/")[0] for name in z.namelist()}
            modules = {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".data"))}
            if modules and missing(sorted(modules)):
                z.extractall(into)
                unpacked.append(wheel.name)
    if unpacked:
        sys.path.insert(0, str(into))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(into), os.environ.get("PYTHONPATH"))))
        importlib.invalidate_caches()
    return unpacked


def setup(checks, args, work):
    """Drawn quadruplets and random weights at the model's sizes, saved as a user's would be."""
    start = time.perf_counter()
    # Any BPE serves these checks; OpenAI's matters only for bench.py's comparison.
    openai = not missing(["clip"])
    words = bench.caption_words(bench.openai_vocab()) if openai else list(PLAIN_WORDS)
    n = 16 if args.small else 1024  # ViT-L/14: 32 steps an epoch at batch 32
    args.pairs = bench.write_pairs(work / "data", n, args.sizes["image_resolution"], words, 0)
    rows = safeclip.read_pairs(args.pairs)
    if openai:
        tokenizer = safeclip.Tokenizer.from_file(bench.openai_vocab())
        tokenizer_note = "OpenAI's (clip-anytorch's vocabulary)"
    else:
        tokenizer = safeclip.Tokenizer.train([r[k] for r in rows for k in ("safe", "unsafe")])
        tokenizer_note = "a BPE trained on the drawn captions (clip-anytorch absent: no OpenAI vocabulary)"
    args.tokenizer, args.words = tokenizer, words
    model = random_model(args.sizes, tokenizer.vocab_size)
    model.tokenizer = tokenizer
    args.weights = work / "weights"
    safeclip.save(model, args.weights)
    del model
    # Matmul FLOPs per quadruplet of `safeclip.py train` on these rows (bench.py's count); the
    # training loop alone does all of it but the reference pass, which runs before the first step.
    lengths = [bench.token_lengths(tokenizer([r[k] for r in rows])) for k in ("safe", "unsafe")]
    flops = bench.training_flops(args.sizes, *lengths, args.batch_size, 1, 0)
    args.loop_flops = flops["ours"] - flops["ours_parts"]["reference"]
    checks.info["tokenizer"] = tokenizer_note
    args.ready = True
    checks.add("set-up", f"{n} drawn quadruplets, random {args.model} weights; tokenizer: {tokenizer_note}; "
               f"{args.loop_flops / 1e9:.3g} GFLOP per quadruplet in the training loop",
               seconds=time.perf_counter() - start)


def random_model(sizes, vocab_size=49408, seed=0):
    torch.manual_seed(seed)
    heads = dict(vision_heads=max(1, sizes["vision_width"] // 64), text_heads=max(1, sizes["text_width"] // 64))
    return safeclip.CLIP(safeclip.CLIPConfig(**sizes, **heads, vocab_size=vocab_size)).eval()


def peak_tflops(args):
    """The device's dense bf16 peak, from bench.py's table of known GPUs; None on a CPU."""
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((v for k, v in bench.PEAK_BF16_TFLOPS.items() if k in name), None)


def mfu_text(rate, flops, peak):
    achieved = rate * flops / 1e12
    return f"{achieved:.3g} TFLOP/s" + (f" = {100 * achieved / peak:.1f}% of {peak:g}" if peak else "")


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


def part_suite(checks, args):
    lacking = missing(SUITE_NEEDS)
    if lacking:
        checks.add("test suite (CPU)", f"it needs {packages(lacking)}, which this Python lacks; CI runs it, "
                   "and the CUDA checks here stand in for it", status="skipped")
        return
    # The dry run of this script is itself a test: the suite never runs it from here. On a GPU
    # machine the suite runs as in CI, on the CPU: its distributed test starts two ranks, which on
    # a one-GPU machine would ask for cuda:1.
    targets = ["tests/test_objective.py"] if args.small else []
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--ignore",
           "tests/test_gpu_check.py", *targets]
    checks.partial = lambda: "the suite was still running"
    proc = sh(cmd, env={"CUDA_VISIBLE_DEVICES": ""})
    summary = (re.findall(r"^=*\s*(\d+ passed.*?)\s*=*$", proc.stdout, re.M) or [proc.stdout.strip()[-200:]])[-1]
    checks.add("test suite (CPU, CUDA_VISIBLE_DEVICES=\"\")" + (f" ({', '.join(targets)}, --small)" if targets else ""),
               summary, "all pass", proc.returncode == 0, time.perf_counter() - start)


def part_parity(checks, args):
    start = time.perf_counter()
    model = random_model(args.sizes, args.tokenizer.vocab_size)
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    ids = args.tokenizer([bench.make_caption(rng, args.words) for _ in range(16)])
    pixels = torch.randn(8, 3, args.sizes["image_resolution"], args.sizes["image_resolution"], generator=g)
    with torch.no_grad():
        cpu = (model.encode_text(ids), model.encode_image(pixels))
        model.to(args.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here
        on_device = tuple(x.float().cpu() for x in (model.encode_text(ids.to(args.device)),
                                                     model.encode_image(pixels.to(args.device))))
        with safeclip.autocast(args.device, "bf16"):
            low = tuple(x.float().cpu() for x in (model.encode_text(ids.to(args.device)),
                                                   model.encode_image(pixels.to(args.device))))
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    rel = max(bench.compare(d, c)["max_rel_diff"] for d, c in zip(on_device, cpu))
    cos = min(bench.compare(lo, d)["min_cosine"] for lo, d in zip(low, on_device))
    what = f"{args.device} vs cpu" + (" (the same device in a dry run)" if args.device == "cpu" else "")
    checks.add(f"parity fp32, {what}, {args.model} sizes, text + image", f"max rel diff {rel:.2e}", "<= 1e-4",
               rel <= 1e-4, time.perf_counter() - start)
    checks.add(f"parity bf16 autocast vs fp32 on {args.device}, text + image", f"min cosine {cos:.5f}", ">= 0.999",
               cos >= 0.999)


def read_records(out):
    """The records of a run's log.jsonl (steps, validations); a run that was cut may have left its
    last line half written."""
    path, records = out / "log.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_log(out):
    """The step records of a run's log.jsonl."""
    return [r for r in read_records(out) if "loss" in r]


def steady_state(records, batch):
    """The training loop's pace once it runs steadily, from the log.jsonl records of a fresh run
    (`safeclip.py train`): dict(rate=quadruplets/s over the steps kept, steps=how many were kept,
    of=how many there were, left_out={why: how many}, loop=quadruplets/s of the whole loop).

    A step record's samples_per_s is cumulative from the loop's start, so step x batch /
    samples_per_s is when that step was logged, and the difference with the step before is the
    step's time: fetching its batch, the step, and whatever the step before set off. Left out:
    the first tenth of the steps (CUDA's warm-up, compilation, the allocator growing), each
    epoch's first step (it waits for the epoch-end checkpoint and for the new epoch's loader to
    start its workers), and a step after a validation (which runs in the loop). Loading, the image
    checks and the reference pass come before the loop starts. The times are the host's: on a GPU
    a step is logged once queued, and the device catches up at the loop's next sync (a log flush,
    a checkpoint), so a kept span of many steps is the device's pace to within about a step."""
    steps = [r for r in records if "loss" in r]
    validated = {r["step"] for r in records if "val" in r}
    warmup = max(1, len(steps) // 10)
    left_out, kept, seconds = dict(warmup=0, epoch_start=0, after_validation=0), 0, 0.0
    for i, r in enumerate(steps):
        if i < warmup:
            left_out["warmup"] += 1
        elif r["epoch"] != steps[i - 1]["epoch"]:
            left_out["epoch_start"] += 1
        elif steps[i - 1]["step"] in validated:
            left_out["after_validation"] += 1
        else:
            kept += 1
            seconds += batch * (r["step"] / r["samples_per_s"] - steps[i - 1]["step"] / steps[i - 1]["samples_per_s"])
    return dict(rate=kept * batch / seconds if kept else None, steps=kept, of=len(steps), left_out=left_out,
                loop=steps[-1]["samples_per_s"] if steps else None)


def pace_text(pace, flops, peak):
    """`steady_state`'s result in words, the whole loop beside the steady steps."""
    names = dict(warmup="warm-up", epoch_start="epoch starts", after_validation="after a validation")
    left = ", ".join(f"{names[why]} {n}" for why, n in pace["left_out"].items() if n)
    if pace["rate"] is None:
        return f"no steady step among {pace['of']} ({left}); loop {pace['loop']:,.1f} quadruplets/s"
    return (f"steady {pace['rate']:,.1f} quadruplets/s over {pace['steps']} of {pace['of']} steps "
            f"({mfu_text(pace['rate'], flops, peak)}; left out: {left}); whole loop {pace['loop']:,.1f}/s "
            f"({mfu_text(pace['loop'], flops, peak)})")


def pace_values(pace, flops, peak, whole=None, whole_flops=None):
    """The numbers behind `pace_text`, for the JSON: rates in quadruplets/s, MFU as fractions of
    the peak (None without one)."""
    def mfu(rate, f):
        return None if rate is None or not peak else rate * f / 1e12 / peak

    values = dict(steady_per_s=pace["rate"], steady_steps=pace["steps"], steps=pace["of"], left_out=pace["left_out"],
                  loop_per_s=pace["loop"], mfu_steady=mfu(pace["rate"], flops), mfu_loop=mfu(pace["loop"], flops))
    if whole is not None:
        values.update(whole_per_s=whole, mfu_whole=mfu(whole, whole_flops))
    return values


def train_argv(args, out, precision, steps, extra=()):
    return ["safeclip.py", "train", "--model", args.weights, "--data", args.pairs, "--out", out,
            "--steps", steps, "--batch-size", args.batch_size, "--precision", precision,
            "--device", args.device, "--lora-dropout", "0", "--lr", "1e-3", "--seed", "0", "--workers", args.workers,
            *extra]


def seed_reference_cache(args, out):
    """The frozen references are computed in float32 whatever --precision says, and cached in
    the run folder: later runs reuse the first one's, as a rerun on the same data would."""
    if args.reference_cache and args.reference_cache.exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.reference_cache, out / args.reference_cache.name)


def prune(out):
    """Keep a finished run's log and reference cache, not its ~1.7 GB of ViT-L/14 weights."""
    for path in out.iterdir():
        if path.name not in ("log.jsonl", "reference.safetensors"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def summary(records, batch):
    """(losses, mean of the first ones, mean of the last ones, `steady_state`)."""
    losses = [r["loss"] for r in records if "loss" in r and not r.get("skipped")]
    k = max(2, len(losses) // 5)  # whole epochs at --small: each batch's loss has its own level
    return losses, statistics.fmean(losses[:k]), statistics.fmean(losses[-k:]), steady_state(records, batch)


def train_steps(args, precision):
    """fp32 on a GPU runs a quarter of --steps (at least torchrun's 20): safeclip.py keeps TF32
    off in fp32, so a ViT-L/14 step of 32 takes ~0.5 s on an H200, against ~0.05 s in bf16."""
    return args.steps if precision != "fp32" or args.small else min(args.steps, max(20, args.steps // 4))


def part_train(checks, args, work, precision, compiled):
    name = f"{precision}{' --compile' if compiled else ''}"
    out = work / f"train-{precision}{'-compile' if compiled else ''}"
    steps = train_steps(args, precision)
    seed_reference_cache(args, out)

    def partial():
        records = read_records(out)
        done = sum("loss" in r for r in records)
        if done < 2:
            return f"{done} step(s) logged"
        _, first, last, pace = summary(records, args.batch_size)
        return f"{done} of {steps} steps: loss {first:.3f} -> {last:.3f}, {pace_text(pace, args.loop_flops, args.peak)}"

    checks.partial = partial
    start = time.perf_counter()
    proc = sh([sys.executable, *train_argv(args, out, precision, steps, ["--compile"] if compiled else [])])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        checks.add(f"train {name}, {steps} steps", f"exit {proc.returncode}: {last_line(proc.stderr)}",
                   ok=False, seconds=seconds)
        return
    if args.reference_cache is None:
        args.reference_cache = out / "reference.safetensors"
    prune(out)
    records = read_records(out)
    log = [r for r in records if "loss" in r]
    losses, first, last, pace = summary(records, args.batch_size)
    rate = pace["rate"] or pace["loop"]  # the steady pace; the whole loop's if no step was steady
    skipped = sum(bool(r.get("skipped")) for r in log)
    args.runs[name] = dict(losses=[r["loss"] for r in log], rate=rate)
    if not compiled:
        args.loop_rates[f"train {name}"] = rate
    ok = len(log) == steps and all(map(math.isfinite, losses)) and last < first and skipped <= max(2, steps // 20)
    whole = steps * args.batch_size / seconds
    checks.add(f"train {name}, {steps} steps of {args.batch_size}",
               f"loss {first:.3f} -> {last:.3f}; {pace_text(pace, args.loop_flops, args.peak)}; whole run "
               f"{whole:,.1f}/s (the process, start to end)" + (f"; {skipped} skipped" if precision == "fp16" else ""),
               "finite, falling", ok, seconds, values=pace_values(pace, args.loop_flops, args.peak, whole))
    eager = args.runs.get(precision)
    if compiled and eager:
        n = min(5, len(eager["losses"]), len(losses))
        diff = max(abs(a - b) / abs(b) for a, b in zip(args.runs[name]["losses"][:n], eager["losses"][:n]))
        tolerance = 1e-3 if precision == "fp32" else 2e-2
        checks.add(f"--compile vs eager, {precision}, first {n} losses", f"max rel diff {diff:.1e}; "
                   f"loop speed {rate / eager['rate']:.2f}x", f"<= {tolerance:g}", diff <= tolerance)


def part_torchrun(checks, args, work):
    """The first steps of the eager fp32 run again, launched by torchrun: the same losses."""
    plain = args.runs.get("fp32")
    if plain is None:
        checks.add("torchrun --nproc_per_node=1", "no finished plain fp32 run to compare with",
                   status="skipped")
        return
    start = time.perf_counter()
    steps = min(args.steps, 20)
    launched = work / "torchrun"
    seed_reference_cache(args, launched)
    proc = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               *train_argv(args, launched, "fp32", steps)])
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if proc.returncode:
        checks.add(f"torchrun --nproc_per_node=1 ({backend})", f"exit {proc.returncode}: {last_line(proc.stderr)}",
                   ok=False, seconds=time.perf_counter() - start)
        return
    prune(launched)
    a, b = plain["losses"][:steps], [r["loss"] for r in read_log(launched)]
    diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    checks.add(f"torchrun --nproc_per_node=1 ({backend}, DDP) vs a plain run, fp32, {steps} steps",
               f"max rel diff of losses {diff:.1e}", "<= 1e-3", len(a) == len(b) == steps and diff <= 1e-3,
               time.perf_counter() - start)


def part_bench(checks, args, work):
    """bench.py's training comparison. The ratios come from the training loop alone (each side's
    rate from its first step to its last, the same measure on both sides), MFU from ours' steady
    steps (`steady_state`); the whole run beside them: at these sizes loading, the image checks
    and the reference pass are a fixed cost a short run cannot spread."""
    lacking = missing(BENCH_NEEDS)
    if lacking:
        checks.add("bench.py vs the public recipe", f"it needs {packages(lacking)}, which this Python lacks"
                   + (f" (`benchmarks/gpu_check.sh --download-wheels` puts clip-anytorch's wheel in {args.wheels})"
                      if "clip" in lacking else ""), status="skipped")
        return
    start = time.perf_counter()
    results = Path(args.results)
    out_json, keep = results / f"bench-{args.tag}.json", work / "bench"
    cmd = [sys.executable, "benchmarks/bench.py", "--device", args.device, "--dtype", "bf16", "--json", out_json,
           "--out", results / f"bench-{args.tag}.md", "--only", "train", "--gc-steps", "0", "--keep", keep]
    # 64 steps a side at batch 32: the recipe in float32 is the slow side (~1 minute on an H200).
    batch = bench.MODES["tiny"]["batch_size"] if args.small else 32
    cmd += ["--tiny", "--threads", "1"] if args.small else ["--model", args.model, "--pairs", "1024",
                                                             "--batch-size", batch, "--epochs", "2"]

    def partial():
        records = read_records(keep / "ours-0")
        if not any("loss" in r for r in records):
            return None
        pace = steady_state(records, batch)
        return f"ours: {pace_text(pace, args.loop_flops, args.peak)}; the recipe's runs were cut"

    checks.partial = partial
    proc = sh(cmd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        checks.add("bench.py --dtype bf16", f"exit {proc.returncode}: {last_line(proc.stderr)}", ok=False,
                   seconds=seconds)
        return
    report = json.loads(out_json.read_text())
    t, peak = report["results"]["train"], report.get("peak_tflops")
    runs = t["runs"]  # per side, bench.py's --train-repeats runs (one here)
    loop = {side: statistics.median(r["loop_samples_per_s"] for r in runs[side]) for side in runs}
    whole = {side: statistics.median(r["samples"] / r["seconds"] for r in runs[side]) for side in runs}
    pace = steady_state(read_records(keep / "ours-0"), batch)
    for side, label, key in (("recipe", "in fp32 as published", "vs_recipe_fp32"),
                             ("recipe-bf16", "with bf16 autocast added", "vs_recipe_bf16")):
        ratio = loop["ours"] / loop[side]
        checks.add(f"training vs the public recipe {label} (bench.py, training loop)",
                   f"{loop['ours']:,.1f} vs {loop[side]:,.1f} quadruplets/s: {ratio:.2f}x; whole run "
                   f"{whole['ours']:,.1f} vs {whole[side]:,.1f}: {whole['ours'] / whole[side]:.2f}x",
                   f">= {TARGETS[key]}x", ratio >= TARGETS[key], seconds if side == "recipe" else None, gpu_only=True,
                   headline=key)
    checks.add("peak memory vs the recipe's (fp32)", f"{t['peak_ratio']:.2f}x", f"<= {TARGETS['peak_memory']}x",
               t["peak_ratio"] <= TARGETS["peak_memory"], gpu_only=True, headline="peak_memory")
    flops = t["flops"]
    loop_flops = flops["ours"] - flops["ours_parts"]["reference"]
    values = pace_values(pace, loop_flops, peak, whole["ours"], flops["ours"])
    # Judged on the steady steps; without one (a log too short), on the whole loop, which says so.
    mfu = values["mfu_steady"] if pace["rate"] is not None else values["mfu_loop"]
    no_peak = "" if peak or not checks.gpu else (f"; not judged: no bf16 peak known for {checks.info['device']} "
                                                 "(bench.PEAK_BF16_TFLOPS)")
    checks.add(f"model FLOP utilisation, training loop (bench.py, ours in bf16, steps of {batch})",
               f"{pace_text(pace, loop_flops, peak)}; whole run {whole['ours']:,.1f}/s "
               f"({mfu_text(whole['ours'], flops['ours'], peak)}){no_peak}",
               f">= {100 * TARGETS['mfu']:.0f}% (steady steps)", None if mfu is None else mfu >= TARGETS["mfu"],
               gpu_only=True, headline="mfu", values=values)
    args.loop_rates["bench.py, ours"] = pace["rate"] or loop["ours"]


def photo_like(rng, size):
    """bench.py's drawn shapes with pixel noise: a JPEG the size of a photo's (~140 KB at 640x480,
    quality 90, as COCO's), which costs the decoder what a photo costs; flat shapes decode faster."""
    base = np.asarray(bench.draw_image(rng, size), dtype=np.int16)
    noise = np.random.default_rng(rng.randrange(2 ** 32)).integers(-30, 31, size=base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def part_loader(checks, args, work):
    """Images/s of the training data loader (safeclip.Quadruplets: decode, resize, crop,
    normalise; one batch per worker at a time, as in training) for 1, 2, 4 and 8 workers, against
    the images/s the training step consumes: 2 per quadruplet."""
    start = time.perf_counter()
    res = args.sizes["image_resolution"]
    size = (640, 480) if res >= 224 else (2 * res, 3 * res // 2)
    folder = work / "loader"
    folder.mkdir()
    rng = random.Random(0)
    files = []
    for i in range(16 if args.small else 256):
        files.append(folder / f"{i}.jpg")
        photo_like(rng, size).save(files[-1], quality=90)
    kib = statistics.fmean(f.stat().st_size for f in files) / 1024
    batch = args.batch_size
    rows = [dict(safe_image=str(files[(2 * i) % len(files)]), unsafe_image=str(files[(2 * i + 1) % len(files)]))
            for i in range(8 * 6 * batch)]
    dataset = safeclip.Quadruplets(rows, safeclip.image_transform(res))
    counts = [w for w in ((1, 2) if args.small else (1, 2, 4, 8)) if w <= (os.cpu_count() or 1)]
    rounds = 3 if args.small else 5
    rates = {}
    for workers in counts:
        batches = [list(range(b * batch, (b + 1) * batch)) for b in range(workers * rounds)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             collate_fn=safeclip.collate_quadruplets)
        arrived, tick = [], time.perf_counter()
        for _ in loader:
            arrived.append(time.perf_counter())
        # The first round includes starting the workers (paid again at every epoch's start).
        rates[workers] = 2 * batch * (len(batches) - workers) / (arrived[-1] - arrived[workers - 1])
        checks.partial = lambda: "; ".join(f"{w} worker(s): {r:,.0f} images/s" for w, r in rates.items())
        checks.add(f"data loader, {workers} worker(s), photo-like JPEGs {size[0]}x{size[1]} ({kib:.0f} KiB) "
                   f"-> {res} px", f"{rates[workers]:,.0f} images/s ({rates[workers] / workers:,.0f} per worker); "
                   f"first batch after {arrived[0] - tick:.2f} s")
    per_worker = max(r / w for w, r in rates.items())
    needs = {}
    if args.loop_rates:
        which, rate = max(args.loop_rates.items(), key=lambda kv: kv[1])
        needs[f"the fastest training loop measured ({which}, {rate:,.1f} quadruplets/s)"] = 2 * rate
    if args.peak and args.loop_flops:
        needs[f"a step at {100 * TARGETS['mfu']:.0f}% MFU"] = 2 * TARGETS["mfu"] * args.peak * 1e12 / args.loop_flops
    default = min(8, os.cpu_count() or 1)  # safeclip.py train's default on CUDA
    for i, (what, need) in enumerate(needs.items()):
        enough = [w for w, r in rates.items() if r >= need]
        keep_up = (f"{enough[0]} worker(s) keep up" if enough else
                   f"none measured keeps up; ~{math.ceil(need / per_worker)} would at {per_worker:,.0f} per worker")
        supply = rates.get(default, per_worker * default)
        checks.add(f"data loader vs {what}", f"needs {need:,.0f} images/s: {keep_up}", f">= need with {default} "
                   "worker(s), the default", supply >= need, time.perf_counter() - start if i == 0 else None,
                   gpu_only=True)
    if not needs:
        checks.add("data loader vs the training step", "no training rate to compare with",
                   seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

# (key for --only, title, budget in seconds on a GPU). --small gives every part SMALL_BUDGET.
# The estimates behind them, on one H200 at ViT-L/14 sizes: a run of `safeclip.py train` spends
# ~20 s starting, loading and checking images; 200 bf16 steps of 32 quadruplets (~670 GFLOP each)
# take ~11 s at 40% MFU; fp32 without TF32 ~0.5 s a step (50 steps); --compile adds ~1 minute;
# bench.py's slow side is the recipe in float32 (~2,000 quadruplets at ~40/s).
PARTS = [("setup", "set-up", 90), ("parity", "parity", 60), ("train-bf16", "train bf16", 75),
         ("bench", "bench.py vs the public recipe", 240), ("loader", "data loader", 60),
         ("train-fp32", "train fp32", 75), ("torchrun", "torchrun", 60), ("compile-bf16", "train bf16 --compile", 150),
         ("train-fp16", "train fp16", 75), ("compile-fp16", "train fp16 --compile", 150),
         ("compile-fp32", "train fp32 --compile", 150), ("suite", "test suite (CPU)", 300)]
SMALL_BUDGET = 300
BENCH_TITLE = next(title for key, title, _ in PARTS if key == "bench")
NEEDS_SETUP = ("parity", "train-bf16", "train-fp32", "torchrun", "train-fp16", "compile-bf16", "compile-fp16",
               "compile-fp32")


def main(argv=None):
    p = argparse.ArgumentParser(description="Check and time the CUDA training path in one go (see gpu_check.sh).")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--small", action="store_true", help="a tiny model and a few steps: the dry run")
    p.add_argument("--steps", type=int, help="training steps per run (default: 200, fp32 a quarter of them; "
                   "6 with --small)")
    p.add_argument("--budget", type=int, help="seconds for the whole check (default: 450; 900 with --small); "
                   "each part also has its own, printed as it starts")
    p.add_argument("--only", nargs="+", choices=[key for key, _, _ in PARTS], metavar="PART",
                   help="run only these parts (set-up comes with any that needs it): "
                        + ", ".join(key for key, _, _ in PARTS))
    p.add_argument("--results", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
                   help="folder for the JSON and markdown (default: $OUT when set, as on the device machine, "
                        "whose $OUT comes back; else benchmarks/results/)")
    p.add_argument("--wheels", default=str(ROOT / "benchmarks" / "wheels"),
                   help="folder of wheels to unpack (not install) for packages this Python lacks "
                        "(default: benchmarks/wheels/)")
    p.add_argument("--allow-skips", action="store_true",
                   help="exit 0 even if a headline check (bench.py's ratios, MFU, memory) could not run")
    p.add_argument("--download-wheels", action="store_true",
                   help=f"only download the wheels of {', '.join(WHEELS)} into --wheels (needs a network), "
                        "for a machine that lacks them")
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.wheels)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda}); a CPU dry run is --device cpu --small")
    args.model = "tiny" if args.small else "L/14"
    args.sizes = bench.MODELS[args.model]
    args.steps = args.steps or (6 if args.small else 200)
    args.budget = args.budget or (900 if args.small else 450)
    args.batch_size = 8 if args.small else 32
    args.workers = 0 if args.small else min(8, os.cpu_count() or 1)
    args.tag = f"{args.device.split(':')[0]}{'-small' if args.small else ''}"
    args.peak = peak_tflops(args)
    args.runs, args.loop_rates, args.reference_cache, args.loop_flops, args.ready = {}, {}, None, None, False
    Path(args.results).mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="safeclip-gpu-check-") as tmp:
        work = Path(tmp)
        lacking = [PACKAGES[m] for m in missing(PACKAGES)]  # not installed, whatever --wheels brings
        unpacked = unpack_wheels(args.wheels, work / "wheels")
        device = (torch.cuda.get_device_name(args.device) if gpu
                  else f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})")
        info = dict(device=device, python=f"{sys.version.split()[0]} ({sys.executable})",
                    torch=torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
                    model=args.model, date=time.strftime("%Y-%m-%d"), small=args.small, steps=args.steps,
                    batch_size=args.batch_size, budget=args.budget, peak_tflops=args.peak,
                    missing=lacking, wheels_unpacked=unpacked)
        checks = Checks(args, info)
        print(f"GPU check on {info['device']}: python {info['python']}, torch {info['torch']}; "
              f"missing: {', '.join(info['missing']) or 'nothing'}; wheels unpacked from {args.wheels}: "
              f"{', '.join(unpacked) or 'none'}", flush=True)
        parts = {
            "setup": lambda: setup(checks, args, work),
            "parity": lambda: part_parity(checks, args),
            "bench": lambda: part_bench(checks, args, work),
            "loader": lambda: part_loader(checks, args, work),
            "torchrun": lambda: part_torchrun(checks, args, work),
            "suite": lambda: part_suite(checks, args),
            **{f"train-{p}": (lambda p=p: part_train(checks, args, work, p, False)) for p in ("bf16", "fp16", "fp32")},
            **{f"compile-{p}": (lambda p=p: part_train(checks, args, work, p, True)) for p in ("bf16", "fp16", "fp32")},
        }
        chosen = [part for part in PARTS if not args.only or part[0] in args.only
                  or part[0] == "setup" and set(args.only) & set(NEEDS_SETUP)]
        for i, (key, title, budget) in enumerate(chosen, 1):
            if key in NEEDS_SETUP and not args.ready:
                checks.skip(title, "the set-up did not finish")
            elif key.startswith("compile") and args.small:
                checks.skip(title, "--small: tests/test_precision.py compiles on the CPU")
            else:
                checks.run(i, len(chosen), title, SMALL_BUDGET if args.small else budget, parts[key])
        lacking, said = checks.headlines_not_run() if any(key == "bench" for key, _, _ in chosen) else ([], [])
        info["headlines_not_run"] = lacking
        checks.write(complete=True)

    print("\n" + render(checks.rows, info))
    for label, rows in (("cut", checks.with_status("cut")), ("skipped", checks.with_status("skipped"))):
        if rows:
            print(f"{len(rows)} {label}: " + "; ".join(f"{r['check']} ({r['result']})" for r in rows), file=sys.stderr)
    if lacking:
        print(f"{len(lacking)} headline check(s) could not run: {', '.join(lacking)} ({'; '.join(said)}). "
              "Where clip-anytorch is missing, `benchmarks/gpu_check.sh --download-wheels` (with a network) puts "
              f"its wheel in {args.wheels} for the GPU machine; " + ("--allow-skips was given." if args.allow_skips
                                                                    else "--allow-skips accepts a run without them."),
              file=sys.stderr)
    failed = checks.with_status("FAIL")
    if failed:
        print(f"{len(failed)} check(s) failed: " + "; ".join(r["check"] for r in failed), file=sys.stderr)
        return 1
    return 3 if lacking and not args.allow_skips else 0


def download_wheels(folder):
    """pip download WHEELS into `folder` (no dependencies, wheels only): what the GPU machine lacks,
    to travel with the checkout. pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, ...) apply."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder),
           *(f"--platform={p}" for p in WHEEL_PLATFORMS), *WHEELS]
    if subprocess.run(cmd).returncode != 0:
        print(f"gpu_check: `{' '.join(cmd)}` failed (its message is above); it needs a network, or pip's "
              "--find-links (PIP_FIND_LINKS) naming a folder that holds these wheels", file=sys.stderr)
        return 1
    wheels = sorted(w.name for w in Path(folder).glob("*.whl"))
    print(f"{folder}: {', '.join(wheels)}. Send this folder along with the checkout (git ignores it); "
          "gpu_check.sh unpacks what the Python it runs lacks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
