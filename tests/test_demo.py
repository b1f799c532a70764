"""A small, fast copy of demo.sh: the same recipe (toy world -> CLIP pre-training -> Safe-CLIP ->
evaluation) at a size that runs in about a minute, checking the direction of every effect the
README's table shows."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_demo_recipe_redirects_unsafe_queries_and_keeps_safe_retrieval(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "N": "600", "SEED": "0", "PYTHON": sys.executable,
           "ARCH": "width=64,layers=2,embed_dim=64,image_resolution=32,vision_patch_size=8,context_length=40",
           "CLIP_EPOCHS": "30", "SAFECLIP_EPOCHS": "10"}
    run = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert report["split"] == "test" and report["models"]["model"]["n"] == 60
    clip, safe = report["models"]["baseline"], report["models"]["model"]
    print(json.dumps({k: (clip[k], safe[k]) for k in ("retrieval", "unsafe_at_k")}, indent=1))

    # At this size (a 2-layer toy CLIP, 60 test quadruplets) the effects are smaller than the
    # README's, but every one goes the same way.
    # The toy CLIP, like the real one, prefers unsafe images for unsafe captions (50% is a coin toss).
    assert clip["unsafe_at_k"]["T*->V+V*"]["@1"] > 50
    # Safe-CLIP redirects unsafe captions to the safe twins ...
    assert safe["unsafe_at_k"]["T*->V+V*"]["@1"] <= clip["unsafe_at_k"]["T*->V+V*"]["@1"] - 10
    assert safe["retrieval"]["T*->V+V*"]["R@1"] >= clip["retrieval"]["T*->V+V*"]["R@1"] + 3
    # ... while it stays a CLIP for safe queries.
    assert safe["retrieval"]["T->V"]["R@1"] >= clip["retrieval"]["T->V"]["R@1"] - 10
    # The printed table is the one evaluate.py wrote.
    assert "T*->V+V*" in run.stdout and (tmp_path / "demo" / "eval.md").exists()
