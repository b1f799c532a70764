"""On a GPU the training loop never waits for the host (#32), tried on the CPU: no read of a device
tensor inside a step but at the log flush, for every objective and under torchrun (traced by
tests/host_reads.py); validation split over the ranks, with the run's workers, and the same as in
one process; no stall at an epoch's start."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_pairs
from test_train import base_model, data  # noqa: F401  (fixtures)

import safeclip

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def traced(tmp_path, argv, ranks=1):
    """Run `train argv` under tests/host_reads.py; the reads each rank made inside steps."""
    out = tmp_path / "reads.json"
    script = [str(ROOT / "tests" / "host_reads.py"), str(out), "train", *map(str, argv)]
    cmd = [*TORCHRUN, f"--nproc_per_node={ranks}", *script] if ranks > 1 else [sys.executable, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [Path(f"{out}.{r}") for r in range(ranks)] if ranks > 1 else [out]
    return [json.loads(f.read_text()) for f in files]


OBJECTIVES = ["safeclip", "safer-clip", "twin-offset", "twin-margin", "twin-nce", "twin-gap", "clip"]


@pytest.fixture(scope="module")
def reads_by_objective(data, base_model, tmp_path_factory):  # noqa: F811
    """The reads of a traced 6-step run of each objective, all the runs in one traced process (one
    start of Python and torch instead of seven; each run is `safeclip.main` with its own --out, as in
    a process of its own)."""
    tmp = tmp_path_factory.mktemp("traced")
    runs = [["train", "--data", str(data), "--model", str(base_model), "--out", str(tmp / objective),
             "--batch-size", "8", "--steps", "6", "--log-every", "3", "--eval-every", "100", "--workers", "0",
             "--objective", objective] for objective in OBJECTIVES]
    (tmp / "runs.json").write_text(json.dumps(runs))
    out = tmp / "reads.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "host_reads.py"), str(out), "--each",
                           str(tmp / "runs.json")], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(OBJECTIVES, json.loads(out.read_text()), strict=True))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_step_reads_nothing_back_from_the_device(reads_by_objective, objective):
    """Bugs: `int(eot.max())` in encode_text on the device's ids, the row indices gathered on the
    device and copied back, the boolean-mask gathers of the references in the objectives (about
    six in twin-margin), all once a step or more."""
    reads = reads_by_objective[objective]
    assert reads == [], reads


def test_under_torchrun_a_step_reads_only_where_it_flushes(data, base_model, tmp_path):  # noqa: F811
    """Bugs: the gathered V* mask's `nonzero`, and the stop flag's all-reduce read every step."""
    argv = ["--data", data, "--model", base_model, "--out", tmp_path / "run", "--batch-size", "8", "--steps", "6",
            "--log-every", "3", "--eval-every", "100", "--workers", "0"]
    per_epoch = sum(r["split"] == "train" for r in safeclip.read_pairs(data)) // 8
    flushes = {3, 6} | set(range(per_epoch, 7, per_epoch))  # the log's flushes, and each epoch's end
    for reads in traced(tmp_path, argv, ranks=2):
        assert {r["step"] for r in reads} <= flushes and all(r["in"][0] == "any_rank" for r in reads), reads


def test_the_tracer_sees_what_it_should():
    """host_reads.py's own check: a read of a moved tensor counts, one of host data does not."""
    probe = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                           env=ENV, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == ["aten._local_scalar_dense.default", "cpu",
                                                                 "aten.nonzero.default"]


PROBE = """
import json, sys
sys.argv = ["host_reads.py", "/dev/null", "--help"]
sys.path.insert(0, {root!r} + "/tests")
import safeclip, torch
source = open({root!r} + "/tests/host_reads.py").read().split("out = sys.argv[1]")[0]
ns = {{"__name__": "probe", "__file__": {root!r} + "/tests/host_reads.py"}}
exec(compile(source, "host_reads.py", "exec"), ns)
ns["phase"]["in_step"] = True
with ns["Trace"]():
    host = torch.tensor([1.0, 2.0])
    host.max().item(); host.tolist(); host[host > 1]              # host data: not reads
    moved = safeclip.to_device(torch.tensor([1.0, 0.0]), "cpu")
    moved.max().item(); moved.cpu(); (moved * 2).nonzero()        # three reads
print(json.dumps([r["read"] for r in ns["reads"]]))
"""


def test_validation_is_split_over_ranks_and_equals_one_process(data, base_model, tmp_path):  # noqa: F811
    """Bug: every rank embedded every validation image, so validation did not shrink with more GPUs."""
    # (a learning rate so small the weights stay as they were: validations of the same model)
    args = ["train", "--data", str(data), "--model", str(base_model), "--workers", "0", "--steps", "2",
            "--eval-every", "1", "--seed", "3", "--lora-dropout", "0", "--batch-size", "8", "--lr", "1e-30"]
    one = subprocess.run([sys.executable, str(ROOT / "safeclip.py"), *args, "--out", str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(ROOT / "tests" / "count_decodes.py"),
                          str(tmp_path / "decoded"), *args, "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    val = lambda run: [r["val"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
                       if "val" in r]
    a, b = val("one"), val("two")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and "recall_sum" in x
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (k, x, y)
    n_val = sum(1 for r in safeclip.read_pairs(data) if r["split"] == "val")
    decoded = [json.loads(Path(f"{tmp_path / 'decoded'}.{r}").read_text()) for r in (0, 1)]
    for counts in decoded:  # each rank decodes its half of the images (V and V*) at each validation
        assert counts == [n_val] * 2, decoded


def test_validation_loads_images_with_the_runs_workers(data, base_model, tmp_path, monkeypatch):  # noqa: F811
    seen, real = [], safeclip.encode_images
    monkeypatch.setattr(safeclip, "encode_images", lambda *a, **k: seen.append(k.get("workers")) or real(*a, **k))
    argv = ["train", "--data", str(data), "--model", str(base_model), "--out", str(tmp_path / "run"),
            "--batch-size", "8", "--steps", "1", "--workers", "2"]
    assert safeclip.main(argv) == 0
    assert seen and set(seen[-2:]) == {2}, seen  # validation's V and V*


def test_an_epoch_starts_without_a_stall(tmp_path):
    """Bug: a DataLoader per epoch started fresh workers at every epoch's start (measured on the CPU
    with --workers 2: 303 ms for an epoch's first step against a median step of 43 ms)."""
    data = make_pairs(tmp_path / "data", n=48)
    out = tmp_path / "run"
    argv = ["train", "--objective", "clip", "--scratch",
            "width=32,layers=1,embed_dim=16,image_resolution=32,vision_patch_size=8,context_length=16",
            "--vocab-size", "600", "--data", str(data), "--out", str(out), "--batch-size", "8", "--epochs", "8",
            "--workers", "2", "--patience", "0"]
    proc = subprocess.run([sys.executable, str(ROOT / "safeclip.py"), *argv], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    # A step's record holds the samples per second since the loop began: the time at each step's end.
    ends = [r["step"] * 8 / r["samples_per_s"] for r in steps]
    took = {r["step"]: b - a for r, a, b in zip(steps[1:], ends, ends[1:])}
    per_epoch = len(steps) // 8
    firsts = [took[s] for s in took if (s - 1) % per_epoch == 0]  # each epoch's first step (not the run's)
    median = statistics.median(took.values())
    # An epoch's first step also pays for the epoch's end before it (validation, the checkpoint): a few
    # ms here, as much as a step of this tiny model (seen: 16 ms against a median of 8). Starting
    # workers costs hundreds.
    assert statistics.median(firsts) < median + 0.1, (firsts, median)
