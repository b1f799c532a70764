"""A small, fast copy of demo.sh: the same recipe (toy world -> CLIP pre-training -> Safe-CLIP on
both towers -> evaluation) at a size that runs in about a minute, checking the direction of every
effect the README's table shows."""

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def test_the_demo_recipe_redirects_unsafe_queries_and_keeps_safe_retrieval(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "N": "800", "SEED": "0", "PYTHON": sys.executable,
           "ARCH": "width=64,layers=2,embed_dim=64,image_resolution=48,vision_patch_size=8,context_length=40",
           "CLIP_EPOCHS": "60", "SAFECLIP_EPOCHS": "10", "SAFECLIP_LR": "3e-3",
           # The paper's LoRA alpha: on this 64-wide copy, the demo's 4 moves the vision tower too far.
           "LORA_ALPHA": "1",
           # One thread: float sums, hence these numbers, do not depend on the machine's core
           # count, and the run does not oversubscribe a CPU shared with other tests.
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert report["split"] == "test" and report["models"]["model"]["n"] == 80
    clip, safe = report["models"]["baseline"], report["models"]["model"]
    print(json.dumps({k: (clip[k], safe[k]) for k in ("retrieval", "unsafe_at_k", "zeroshot")}, indent=1))
    recall = lambda m, key: m["retrieval"][key]["R@1"]
    unsafe = lambda m, key: m["unsafe_at_k"][key]["@1"]

    # At this size (a 2-layer toy CLIP, 80 test quadruplets: a query is 1.25 points) the effects are
    # smaller than the README's, but every one goes the same way, for captions and for images alike.
    for caption_or_image, mixed in (("T*->V", "T*->V+V*"), ("V*->T", "V*->T+T*")):
        # The toy CLIP, like the real one, prefers unsafe items for unsafe queries (50%: a coin toss).
        assert unsafe(clip, mixed) > 55, mixed
        # Safe-CLIP redirects unsafe queries to the safe twins ...
        assert unsafe(safe, mixed) <= unsafe(clip, mixed) - 8, mixed
        assert recall(safe, caption_or_image) >= recall(clip, caption_or_image) + 5, caption_or_image
    # ... while it stays a CLIP for safe queries (chance is 1.25%) ...
    for key in ("T->V", "V->T"):
        assert recall(safe, key) >= recall(clip, key) - 10, key
    # ... and keeps most of what it knew: the colour of lone objects, 12 classes (chance 8.3%), which
    # the toy CLIP has really learned (this small copy loses about 10 points of it, the demo 4).
    zeroshot = clip["zeroshot"]
    images = [p for p in (tmp_path / "demo" / "data" / "zeroshot").rglob("*.png")]
    assert zeroshot["classes"] == 12 and zeroshot["n"] == len(images) >= 80
    assert zeroshot["top1"] >= 3 * 100 / 12
    assert safe["zeroshot"]["top1"] >= zeroshot["top1"] - 12
    assert safe["zeroshot"]["top1"] <= safe["zeroshot"]["top5"] <= 100
    # The printed table is the one evaluate.py wrote, and the picture is drawn.
    assert "T*->V+V*" in run.stdout and (tmp_path / "demo" / "eval.md").exists()
    assert Image.open(tmp_path / "demo" / "retrieval.png").format == "PNG"


def test_the_objectives_benchmark_trains_each_objective_on_the_same_budget_and_compares_them(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "obj"), "N": "200", "SEED": "0", "PYTHON": sys.executable,
           "ARCH": "width=64,layers=1,embed_dim=32,image_resolution=32,vision_patch_size=16,context_length=40",
           "CLIP_EPOCHS": "2", "SAFECLIP_EPOCHS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "objectives.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "obj"
    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["model", "safeclip", "safer-clip", "twin-offset-a2", "baseline"]
    runs = {"safeclip": out / "demo" / "safeclip", "safer-clip": out / "safer-clip", "twin-offset": out / "twin-offset",
            "twin-offset-a2": out / "twin-offset-a2"}
    logs = {name: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for name, run in runs.items()}
    configs = {name: json.loads((run / "train_config.json").read_text()) for name, run in runs.items()}
    assert len({sum("loss" in r for r in log) for log in logs.values()}) == 1  # the same number of steps
    # ... and the same recipe: the demo's, down to its LoRA and InfoNCE scale
    assert len({(c["batch_size"], c["lr"], c["seed"], c["model"], c["lora_alpha"], c["nce_scale"])
                for c in configs.values()}) == 1
    assert configs["safeclip"]["nce_scale"] == "model" and configs["safeclip"]["lora_alpha"] == 4
    assert {c["objective"] for c in configs.values()} == {"safeclip", "safer-clip", "twin-offset"}
    assert (configs["twin-offset"]["offset"], configs["twin-offset-a2"]["offset"]) == (1, 2)
    assert not configs["twin-offset"]["freeze"]
    summary = (out / "summary.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if line.startswith("| ")][1:]
    assert rows == ["toy CLIP", "safeclip", "safer-clip", "twin-offset-a2", "twin-offset (a=1)"]
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
