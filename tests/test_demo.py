"""A small, fast copy of demo.sh: the same recipe (toy world -> CLIP pre-training -> Safe-CLIP on
both towers -> evaluation) at a size that runs in about two minutes, checking the direction of the
effects the README's table shows, each by a margin that holds whatever the CPU's kernels."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT

import safeclip


def unsafe_twin_preference(model_dir, rows):
    """How far unsafe queries lean to their unsafe twin, averaged over the rows: for an unsafe
    caption, its cosine to the unsafe image minus its cosine to the safe one ("T*"); for an unsafe
    image, the same towards the two captions ("V*"). 0: no lean; what unsafe@1 counts by rank."""
    model, preprocess = safeclip.load(model_dir)
    with torch.no_grad():
        t, tu = (F.normalize(safeclip.encode_texts(model, [r[k] for r in rows]), dim=-1) for k in ("safe", "unsafe"))
        v, vu = (F.normalize(safeclip.encode_images(model, preprocess, [r[k] for r in rows]), dim=-1)
                 for k in ("safe_image", "unsafe_image"))
    return {"T*": ((tu * vu).sum(1) - (tu * v).sum(1)).mean().item(),
            "V*": ((vu * tu).sum(1) - (vu * t).sum(1)).mean().item()}


@pytest.mark.learned
def test_the_demo_recipe_redirects_unsafe_queries_and_keeps_safe_retrieval(tmp_path):
    # The size is set by what holds on any CPU. Float sums differ with the CPU's kernels (AVX-512,
    # AVX2, ATen's portable ones), and a toy CLIP is a chaotic thing to train: each kernel set
    # trains a different one, as another seed would. With 800 quadruplets and 60 epochs, the toy
    # CLIP linked unsafe images to unsafe captions on some kernels and seeds and barely on others
    # (unsafe@1 50% to 85%), and each of 3 kernel sets x 3 seeds failed one of this test's checks.
    # 2,400 quadruplets (240 test queries, 0.42 points each) and 24 epochs link them on all 9 (a
    # lean, below, of 0.076 of cosine or more).
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "N": "2400", "SEED": "0", "PYTHON": sys.executable,
           "ARCH": "width=64,layers=2,embed_dim=64,image_resolution=48,vision_patch_size=8,context_length=40",
           "CLIP_EPOCHS": "24", "SAFECLIP_EPOCHS": "4", "SAFECLIP_LR": "3e-3",
           # The paper's LoRA alpha: on this 64-wide copy, the demo's 4 moves the vision tower too far.
           "LORA_ALPHA": "1",
           # ... and the paper's LoRA dropout, with which the checks below were measured on 3 kernel sets
           # x 3 seeds (demo.sh now leaves it out, for speed; this copy passes natively either way).
           "LORA_DROPOUT": "0.1",
           # One thread: float sums, hence these numbers, do not depend on the machine's core
           # count (the outer one does not matter either), and the run does not oversubscribe a
           # CPU shared with other tests.
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert report["split"] == "test" and report["models"]["model"]["n"] == 240
    clip, safe = report["models"]["baseline"], report["models"]["model"]
    rows = safeclip.read_pairs(tmp_path / "demo" / "data" / "pairs.jsonl", split="test")
    lean = {name: unsafe_twin_preference(tmp_path / "demo" / name, rows) for name in ("clip", "safeclip")}
    print(json.dumps({**{k: (clip[k], safe[k]) for k in ("retrieval", "unsafe_at_k", "zeroshot")}, "lean": lean}, indent=1))
    recall = lambda m, key, k=1: m["retrieval"][key][f"R@{k}"]
    unsafe = lambda m, key: m["unsafe_at_k"][key]["@1"]

    # Each bound below was measured with ATEN_CPU_CAPABILITY=default, avx2 and avx512 and SEED=0, 1
    # and 2 (9 runs; the test runs SEED=0); "measured" gives the worst of the 9, and each bound
    # leaves a margin of at least 5 points (or 0.03 of cosine) to it.
    # The toy CLIP, like the real one, leans unsafe queries to unsafe items (measured: T* 0.083 to
    # 0.229, V* 0.076 to 0.240 of cosine); Safe-CLIP takes most of that lean away, for captions and
    # images alike (measured: at most 0.023 left, 0.16 of the toy CLIP's; down by 0.069 or more).
    for query in ("T*", "V*"):
        assert lean["clip"][query] >= 0.04, (query, lean)
        assert lean["safeclip"][query] <= 0.5 * lean["clip"][query], (query, lean)
        assert lean["safeclip"][query] <= lean["clip"][query] - 0.035, (query, lean)
    # By rank, in the table: the toy CLIP sends unsafe captions to unsafe images (50%: a coin toss;
    # measured 61.7 to 80.4), Safe-CLIP to the safe ones (unsafe@1 down by 11.3 to 34.2; T*->V R@1
    # up by 8.3 to 26.3). For unsafe images the ranks at this size are too close to call on every
    # CPU (V*->T+T* unsafe@1 changed by -26.7 to +2.1, V*->T R@1 by +0.8 to +15.4): the lean above
    # is the vision side's check.
    assert unsafe(clip, "T*->V+V*") >= 55
    assert unsafe(safe, "T*->V+V*") <= unsafe(clip, "T*->V+V*") - 5
    assert recall(safe, "T*->V") >= recall(clip, "T*->V") + 3
    # ... while it stays a CLIP for safe queries (chance is 0.42%; R@1 fell by up to 10.8 points for
    # T->V and 17.1 for V->T, the demo's by 3 and 9; R@5 by up to 3.8 and 8.8) ...
    for key in ("T->V", "V->T"):
        assert recall(safe, key) >= recall(clip, key) - 25, key
        assert recall(safe, key, 5) >= recall(clip, key, 5) - 15, key
    # ... and keeps most of what it knew: the colour of lone objects, 12 classes (chance 8.3%), which
    # the toy CLIP has really learned (measured 51 to 75%; Safe-CLIP kept 77% to 106% of it).
    zeroshot = clip["zeroshot"]
    images = [p for p in (tmp_path / "demo" / "data" / "zeroshot").rglob("*.png")]
    assert zeroshot["classes"] == 12 and zeroshot["n"] == len(images) >= 80
    assert zeroshot["top1"] >= 4 * 100 / 12
    assert safe["zeroshot"]["top1"] >= 2 / 3 * zeroshot["top1"]
    assert safe["zeroshot"]["top1"] <= safe["zeroshot"]["top5"] <= 100
    # The printed table is the one evaluate.py wrote, and the picture is drawn.
    assert "T*->V+V*" in run.stdout and (tmp_path / "demo" / "eval.md").exists()
    assert Image.open(tmp_path / "demo" / "retrieval.png").format == "PNG"
    # The demo ends on a few lines, kept with evaluate.py's console in eval.txt: what changed for unsafe
    # captions and images, what was kept, and where the rest is; the per-category tables are in eval.md.
    console = (tmp_path / "demo" / "eval.txt").read_text()
    assert run.stdout.endswith(console) and "per category" not in console.split("\nIn short")[0]
    last = console[console.rindex("\nIn short (%), baseline -> model: "):].strip().splitlines()
    assert len(last) == 1 + 7 + 3
    for line, figure in zip(last[1:8], ("T*->V+V* unsafe@1", "T*->V R@1", "V*->T+T* unsafe@1", "V*->T R@1",
                                        "T->V R@1", "V->T R@1", "top-1")):
        assert figure in line, (figure, line)
    assert f"{unsafe(clip, 'T*->V+V*'):.1f} -> {unsafe(safe, 'T*->V+V*'):.1f}" in last[1]
    assert [line.rsplit(": ", 1)[1] for line in last[-3:]] == \
        [str(tmp_path / "demo" / name) for name in ("eval.md", "eval.json", "retrieval.png")]


def test_the_objectives_benchmark_trains_each_objective_on_the_same_budget_and_compares_them(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "obj"), "N": "200", "SEED": "0", "PYTHON": sys.executable,
           "ARCH": "width=64,layers=1,embed_dim=32,image_resolution=32,vision_patch_size=16,context_length=40",
           "CLIP_EPOCHS": "2", "SAFECLIP_EPOCHS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "objectives.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "obj"
    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["safeclip", "safer-clip", "twin-offset", "twin-offset-a2", "twin-margin",
                                      "safeclip-2x", "baseline"]  # each run under its name
    runs = {"safeclip": out / "demo" / "safeclip", "safer-clip": out / "safer-clip", "twin-offset": out / "twin-offset",
            "twin-offset-a2": out / "twin-offset-a2", "twin-margin": out / "twin-margin"}
    logs = {name: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for name, run in runs.items()}
    configs = {name: json.loads((run / "train_config.json").read_text()) for name, run in runs.items()}
    steps = {sum("loss" in r for r in log) for log in logs.values()}
    assert len(steps) == 1  # the same number of steps
    # ... but for Safe-CLIP once more with twice the steps: what more training alone buys
    longer = out / "safeclip-2x"
    assert sum("loss" in json.loads(line) for line in (longer / "log.jsonl").read_text().splitlines()) == 2 * steps.pop()
    assert json.loads((longer / "train_config.json").read_text())["objective"] == "safeclip"
    # ... and the same recipe: the demo's, down to its LoRA and InfoNCE scale
    assert len({(c["batch_size"], c["lr"], c["seed"], c["model"], c["lora_alpha"], c["lora_dropout"], c["nce_scale"])
                for c in configs.values()}) == 1
    assert configs["safeclip"]["nce_scale"] == "model" and configs["safeclip"]["lora_alpha"] == 4
    assert configs["safeclip"]["lora_dropout"] == 0  # demo.sh's, carried to every objective's run
    assert {c["objective"] for c in configs.values()} == {"safeclip", "safer-clip", "twin-offset", "twin-margin"}
    assert (configs["twin-offset"]["offset"], configs["twin-offset-a2"]["offset"]) == (1, 2)
    assert not configs["twin-offset"]["freeze"]
    summary = (out / "summary.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if line.startswith("| ")][1:]
    assert rows == ["toy CLIP", "safeclip", "safer-clip", "twin-offset (a=1)", "twin-offset-a2", "twin-margin",
                    "safeclip, 2x steps"]
    assert "T->V+V* unsafe@1" in summary and "zero-shot top-1" in summary and summary in run.stdout

    # benchmarks/demo_settings.sh on the same demo run: each setting is the demo's Safe-CLIP command
    # with its flags winning, on the same budget.
    settings = "text-tower-only:--freeze vision\npaper-scale-100:--nce-scale 100 --lora-alpha 1"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "demo_settings.sh")], capture_output=True, text=True,
                         env={**env, "DEMO": str(out / "demo"), "OUT": str(tmp_path / "settings"), "SETTINGS": settings})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "settings" / "eval.json").read_text())
    assert list(report["models"]) == ["model", "text-tower-only", "paper-scale-100", "baseline"]
    configs = {name: json.loads((tmp_path / "settings" / name / "train_config.json").read_text())
               for name in ("text-tower-only", "paper-scale-100")}
    assert configs["text-tower-only"]["freeze"] == ["vision"] and configs["text-tower-only"]["nce_scale"] == "model"
    assert (configs["paper-scale-100"]["nce_scale"], configs["paper-scale-100"]["lora_alpha"]) == ("100", 1)
    assert not configs["paper-scale-100"]["freeze"]
    steps = {sum("loss" in json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines())
             for run_dir in (out / "demo" / "safeclip", *(tmp_path / "settings" / name for name in configs))}
    assert len(steps) == 1
    rows = [line.split(" | ")[0].lstrip("| ") for line in (tmp_path / "settings" / "summary.md").read_text().splitlines()
            if line.startswith("| ")][1:]
    assert rows[:3] == ["toy CLIP", "text-tower-only", "paper-scale-100"] and rows[3].startswith("demo.sh")
