"""benchmarks/gpu_check.sh, the one prepared GPU check, runs end to end on the CPU (--small), so it
is known to work before a GPU ever sees it: every part reports within its budget, the table and its
JSON are written (to $OUT when set), and a failing check makes the exit status non-zero. Other dry
runs imitate the GPU machine it will meet: a python3 of its own, no network, and none of
clip-anytorch, ftfy, wcwidth or diffusers installed. Without their wheels the headline checks
cannot run and the exit status says so (unless --allow-skips); with the wheels that
`gpu_check.sh --download-wheels` prepares, every check runs. Model FLOP utilisation is taken from
the steady steps of a run's log, the whole loop and the whole run beside it."""

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

# A sitecustomize.py that makes this Python look like the GPU machine's: the packages it lacks are
# not found in site-packages (a copy unpacked elsewhere, such as a wheel from --wheels, still is),
# and neither is their metadata.
LIKE_THE_GPU_MACHINE = '''
import site, sys
from importlib.machinery import PathFinder
HIDDEN = {"clip": "clip-anytorch", "ftfy": "ftfy", "wcwidth": "wcwidth", "diffusers": "diffusers"}
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


def dry_run(tmp_path, *args, like_gpu_machine=False, out=None):
    """gpu_check.sh --device cpu --small ARGS -> (the process, the JSON report). The results go to
    tmp_path/results by --results; with `out`, to $OUT as on the device machine (no --results)."""
    results = out or tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **({"OUT": str(out)} if out else {}))
    if like_gpu_machine:
        (tmp_path / "site").mkdir(exist_ok=True)
        (tmp_path / "site" / "sitecustomize.py").write_text(LIKE_THE_GPU_MACHINE)
        # No network: anything that tried to reach one would fail at once.
        env.update(PYTHONPATH=str(tmp_path / "site"), HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                   http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    where = [] if out else ["--results", str(results)]
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--small", *where, "--wheels",
                           str(tmp_path / "wheels"), *args], capture_output=True, text=True, env=env, timeout=900)
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
    assert report["info"]["headlines_not_run"] == []
    skipped = [r["check"] for r in report["checks"] if r["status"] == "skipped"]
    assert skipped == [f"train {p} --compile" for p in ("bf16", "fp16", "fp32")]  # left to test_precision.py
    assert all(r["status"] in ("pass", "info", "n/a (cpu)") for r in report["checks"] if r["check"] not in skipped)
    assert checks["train fp16"]["status"] == checks["torchrun --nproc_per_node=1"]["status"] == "pass"
    assert checks["test suite"]["status"] == "pass"
    # Model FLOP utilisation from the steady steps, the whole loop and the whole run beside them:
    # bench.py --tiny trains 2 epochs of 2 steps, so 2 steps are steady (the first is the warm-up,
    # the third an epoch's start); the train parts 3 epochs of 2 steps.
    mfu = checks["model FLOP utilisation"]
    assert mfu["target"] == ">= 40% (steady steps)" and mfu["status"] == "n/a (cpu)"
    assert "steady " in mfu["result"] and "whole loop " in mfu["result"] and "whole run " in mfu["result"]
    assert (mfu["values"]["steady_steps"], mfu["values"]["steps"]) == (2, 4)
    assert mfu["values"]["left_out"] == dict(warmup=1, epoch_start=1, after_validation=0)
    assert all(mfu["values"][k] > 0 for k in ("steady_per_s", "loop_per_s", "whole_per_s"))
    train = checks["train bf16"]["values"]
    assert (train["steady_steps"], train["steps"], train["left_out"]["epoch_start"]) == (3, 6, 2)
    # Each part is announced with its budget, and the table goes to stdout and to --results.
    assert "[part 3/12] train bf16 ... budget 300 s" in proc.stdout
    table = (tmp_path / "results" / "gpu_check-cpu-small.md").read_text()
    assert table.count("\n| ") == len(report["checks"]) + 1 and table in proc.stdout


def test_a_dry_run_like_the_gpu_machine_skips_what_needs_a_missing_package(tmp_path):
    proc, report = dry_run(tmp_path, "--allow-skips", like_gpu_machine=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["info"]["missing"] == ["clip-anytorch", "ftfy", "wcwidth", "diffusers"] and report["info"]["complete"]
    checks = by_check(report)
    suite, bench = checks["test suite"], checks["bench.py vs the public recipe"]
    assert suite["status"] == bench["status"] == "skipped"
    assert "clip-anytorch, ftfy, wcwidth, diffusers" in suite["result"]
    assert "clip-anytorch" in bench["result"] and str(tmp_path / "wheels") in bench["result"]
    assert "--download-wheels" in bench["result"]
    # Everything else runs, tokenized by a BPE trained on the drawn captions.
    assert "BPE trained on the drawn captions" in checks["set-up"]["result"]
    for check in ("parity fp32", "train bf16", "train fp16", "train fp32", "torchrun --nproc_per_node=1"):
        assert checks[check]["status"] == "pass", checks[check]
    assert "data loader vs the fastest training loop measured" in checks
    assert "5 skipped: " in proc.stderr  # the 3 --compile parts, the suite, bench.py
    # The headline checks did not run: said, and accepted only because of --allow-skips.
    assert len(report["info"]["headlines_not_run"]) == 4
    assert "4 headline check(s) could not run" in proc.stderr and "--allow-skips was given" in proc.stderr


def test_a_headline_check_that_could_not_run_fails_the_run_unless_skips_are_allowed(tmp_path):
    proc, report = dry_run(tmp_path, "--only", "bench", like_gpu_machine=True)
    assert proc.returncode == 3, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["info"]["complete"] and report["info"]["headlines_not_run"] == [
        "speed vs the recipe in fp32", "speed vs the recipe with bf16", "model FLOP utilisation",
        "peak memory vs the recipe's"]
    assert "4 headline check(s) could not run" in proc.stderr and "clip-anytorch" in proc.stderr
    assert "benchmarks/gpu_check.sh --download-wheels" in proc.stderr and "--allow-skips" in proc.stderr
    # Parts that hold no headline check may be left out without it.
    proc, _ = dry_run(tmp_path, "--only", "parity", like_gpu_machine=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_the_results_go_to_OUT_when_it_is_set(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc, report = dry_run(tmp_path, "--only", "bench", "--allow-skips", like_gpu_machine=True, out=out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check-cpu-small.json", "gpu_check-cpu-small.md"]
    assert not (tmp_path / "results").exists()


def wheel_of(name, folder):
    """A wheel of an installed distribution, as a package index would serve it."""
    dist = importlib.metadata.distribution(name)
    wheel = folder / f"{name.replace('-', '_')}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for file in dist.files:
            if not str(file).startswith("..") and "__pycache__" not in file.parts:
                z.write(dist.locate_file(file), str(file))
    return wheel


def test_the_wheels_download_wheels_prepares_let_every_check_run_on_a_machine_without_them(tmp_path):
    # pip's own settings stand in for the network: an index of wheels of what is installed here.
    index = tmp_path / "index"
    index.mkdir()
    for name in ("clip-anytorch", "ftfy", "wcwidth", "diffusers"):
        wheel_of(name, index)
    env = {**os.environ, "PYTHON": sys.executable, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(index)}
    proc = subprocess.run(["bash", str(SCRIPT), "--download-wheels", "--wheels", str(tmp_path / "wheels")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = sorted(p.name for p in (tmp_path / "wheels").iterdir())
    assert wheels == sorted(p.name for p in index.iterdir())

    proc, report = dry_run(tmp_path, "--only", "bench", "suite", like_gpu_machine=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(report["info"]["wheels_unpacked"]) == wheels
    assert report["info"]["missing"] == ["clip-anytorch", "ftfy", "wcwidth", "diffusers"]  # unpacked, not installed
    assert report["info"]["headlines_not_run"] == []
    checks = by_check(report)
    assert list(checks) == ["training vs the public recipe in fp32 as published", "training vs the public recipe "
                            "with bf16 autocast added", "peak memory vs the recipe's", "model FLOP utilisation",
                            "test suite"]
    assert checks["test suite"]["status"] == "pass"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_steady_pace_leaves_out_warm_up_epoch_starts_and_steps_after_a_validation():
    # A log.jsonl as `safeclip.py train` writes it (samples_per_s cumulative from the loop's start):
    # 20 steps of 8 in 2 epochs of 10, each 0.1 s, except the first two (CUDA's warm-up: 2 s, 1 s),
    # the eleventh (the new epoch's loader starting its workers, 1 s) and the sixteenth (after a
    # validation, 3 s).
    batch, slow = 8, {1: 2.0, 2: 1.0, 11: 1.0, 16: 3.0}
    records, clock = [{"step": 0, "terms": []}], 0.0
    for step in range(1, 21):
        clock += slow.get(step, 0.1)
        records.append(dict(step=step, epoch=1 + (step - 1) // 10, loss=1.0, samples_per_s=step * batch / clock))
        if step == 15:
            records.append(dict(step=15, val={"loss": 1.0}, best_step=15))
    pace = load_gpu_check().steady_state(records, batch)
    assert pace["left_out"] == dict(warmup=2, epoch_start=1, after_validation=1)
    assert (pace["steps"], pace["of"]) == (16, 20)
    assert math.isclose(pace["rate"], batch / 0.1)
    assert math.isclose(pace["loop"], 20 * batch / clock)  # the whole loop's pace, beside it


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
