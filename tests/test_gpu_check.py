"""benchmarks/gpu_check.sh, the one prepared GPU check, runs end to end on the CPU (--small), so it
is known to work before a GPU ever sees it: every part reports within its budget, the table and its
JSON are written, and a failing check makes the exit status non-zero. A second dry run imitates
the GPU machine it will meet: a python3 of its own, no network, and none of clip-anytorch, ftfy or
diffusers installed; there the check completes and says what it skipped and why."""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

# A sitecustomize.py that makes this Python look like the GPU machine's: the packages it lacks are
# not found in site-packages (a copy unpacked elsewhere, such as a wheel from --wheels, still is),
# and neither is their metadata.
LIKE_THE_GPU_MACHINE = '''
import site, sys
from importlib.machinery import PathFinder
HIDDEN = {"clip": "clip-anytorch", "ftfy": "ftfy", "diffusers": "diffusers"}
SITE = tuple(site.getsitepackages())

class WithoutSomePackages:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is None and name in HIDDEN:
            path = [p for p in sys.path if not p.startswith(SITE)]
        return PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(context):
        hidden = {d.replace("-", "_") for d in HIDDEN.values()}
        return (d for d in PathFinder.find_distributions(context)
                if (d.metadata["Name"] or "").lower().replace("-", "_") not in hidden)

    invalidate_caches = PathFinder.invalidate_caches

sys.meta_path[sys.meta_path.index(PathFinder)] = WithoutSomePackages
'''


def dry_run(tmp_path, *args, like_gpu_machine=False):
    """gpu_check.sh --device cpu --small ARGS -> (the process, the JSON report)."""
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    if like_gpu_machine:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(LIKE_THE_GPU_MACHINE)
        # No network: anything that tried to reach one would fail at once.
        env.update(PYTHONPATH=str(tmp_path / "site"), HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                   http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--small", "--results", str(results),
                           "--wheels", str(tmp_path / "wheels"), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    report = json.loads((results / "gpu_check-cpu-small.json").read_text())
    return proc, report


def by_check(report):
    return {r["check"].split(",")[0].split(" (")[0]: r for r in report["checks"]}


def test_the_cpu_dry_run_passes_end_to_end(tmp_path):
    proc, report = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = by_check(report)
    for check in ("set-up", "parity fp32", "parity bf16 autocast vs fp32 on cpu", "train bf16", "train fp16",
                  "train fp32", "torchrun --nproc_per_node=1", "data loader", "data loader vs the fastest training "
                  "loop measured", "training vs the public recipe in fp32 as published", "training vs the public "
                  "recipe with bf16 autocast added", "peak memory vs the recipe's", "model FLOP utilisation",
                  "test suite"):
        assert check in checks, (check, list(checks))
    assert report["info"]["complete"] and report["info"]["missing"] == []
    skipped = [r["check"] for r in report["checks"] if r["status"] == "skipped"]
    assert skipped == [f"train {p} --compile" for p in ("bf16", "fp16", "fp32")]  # left to test_precision.py
    assert all(r["status"] in ("pass", "info", "n/a (cpu)") for r in report["checks"] if r["check"] not in skipped)
    assert checks["train fp16"]["status"] == checks["torchrun --nproc_per_node=1"]["status"] == "pass"
    assert checks["test suite"]["status"] == "pass"
    # Each part is announced with its budget, and the table goes to stdout and to --results.
    assert "[part 3/12] train bf16 ... budget 300 s" in proc.stdout
    table = (tmp_path / "results" / "gpu_check-cpu-small.md").read_text()
    assert table.count("\n| ") == len(report["checks"]) + 1 and table in proc.stdout


def test_a_dry_run_like_the_gpu_machine_skips_what_needs_a_missing_package(tmp_path):
    proc, report = dry_run(tmp_path, like_gpu_machine=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["info"]["missing"] == ["clip-anytorch", "ftfy", "diffusers"] and report["info"]["complete"]
    checks = by_check(report)
    suite, bench = checks["test suite"], checks["bench.py vs the public recipe"]
    assert suite["status"] == bench["status"] == "skipped"
    assert "clip-anytorch, ftfy, diffusers" in suite["result"]
    assert "clip-anytorch" in bench["result"] and str(tmp_path / "wheels") in bench["result"]
    # Everything else runs, tokenized by a BPE trained on the drawn captions.
    assert "BPE trained on the drawn captions" in checks["set-up"]["result"]
    for check in ("parity fp32", "train bf16", "train fp16", "train fp32", "torchrun --nproc_per_node=1"):
        assert checks[check]["status"] == "pass", checks[check]
    assert "data loader vs the fastest training loop measured" in checks
    assert "5 skipped: " in proc.stderr  # the 3 --compile parts, the suite, bench.py


def clip_wheel(folder):
    """A wheel of the installed clip-anytorch, as `pip download --no-deps clip-anytorch` brings it."""
    package = importlib.util.find_spec("clip").submodule_search_locations[0]
    folder.mkdir()
    wheel = folder / f"clip_anytorch-{importlib.metadata.version('clip-anytorch')}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path in sorted(p for p in Path(package).iterdir() if p.is_file()):
            z.write(path, f"clip/{path.name}")
    return wheel


def test_clip_anytorch_travels_as_a_wheel_and_bench_runs_without_installing_it(tmp_path):
    wheel = clip_wheel(tmp_path / "wheels")
    proc, report = dry_run(tmp_path, "--only", "bench", like_gpu_machine=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["info"]["wheels_unpacked"] == [wheel.name]
    checks = by_check(report)
    assert list(checks) == ["training vs the public recipe in fp32 as published", "training vs the public recipe "
                            "with bf16 autocast added", "peak memory vs the recipe's", "model FLOP utilisation"]
    assert "clip-anytorch" in report["info"]["missing"]  # still not installed: it was only unpacked


def test_a_part_over_its_budget_is_cut_and_the_run_goes_on(tmp_path):
    start = time.perf_counter()
    proc, report = dry_run(tmp_path, "--only", "train-bf16", "loader", "--steps", "5000", "--budget", "10")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert time.perf_counter() - start < 60
    checks = by_check(report)
    assert checks["train bf16"]["status"].startswith("cut (budget ")
    assert checks["train bf16"]["result"].startswith("cut after ")
    # The loader had no time left: reported as such, and the report is complete.
    loader = checks["data loader"]
    assert loader["status"] == "skipped" and "--budget of 10 s is spent" in loader["result"]
    assert report["info"]["complete"] and "1 cut: train bf16" in proc.stderr


def run_sh(tmp_path, python3_sees_a_gpu, script=SCRIPT, *args):
    """gpu_check.sh with PYTHON unset and a python3 on PATH whose torch does or does not see a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    probe = "exit 0" if python3_sees_a_gpu else "exit 1"
    (bin_dir / "python3").write_text(f'#!/bin/sh\ncase "$*" in *cuda.is_available*) {probe};; esac\n'
                                     f'exec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_sh_runs_a_python3_that_sees_a_gpu_as_it_is(tmp_path):
    proc = run_sh(tmp_path, True, SCRIPT, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "gpu_check.sh: python3 (its torch sees a GPU)" in proc.stderr and "--budget" in proc.stdout


def test_gpu_check_sh_without_a_usable_python_says_what_to_do(tmp_path):
    script = tmp_path / "repo" / "benchmarks" / "gpu_check.sh"  # a checkout without .venv
    script.parent.mkdir(parents=True)
    shutil.copy(SCRIPT, script)
    proc = run_sh(tmp_path, False, script)
    assert proc.returncode == 2
    assert "no Python to run with" in proc.stderr and "PYTHON=" in proc.stderr and "--setup" in proc.stderr
