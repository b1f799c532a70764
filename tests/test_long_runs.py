"""What long runs meet: a full disk at any write, a damaged checkpoint, a second run on the same
folder, a resume with other settings, SIGTERM and Ctrl-C. Each ends in one line that names the
file and says what is intact, leaves the folder as it was (or, for a signal, with the checkpoint
at the step reached), and a resumed run equals a straight one."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, _whole_records
from test_train import base_model, data, trainable_state, train  # noqa: F401  (fixtures)

import safeclip


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_weights(a, b):
    a, b = trainable_state(a), trainable_state(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k


def main_error(argv, capsys):
    """safeclip.main(argv) -> its stderr's last line, checking it failed without a traceback."""
    assert safeclip.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def argv(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--out", str(out), "--batch-size", "8",
            "--workers", "0", "--seed", "1", *map(str, extra)]


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


# Which write fails: the file it writes and the function that writes it.
WRITES = {"checkpoint": ("_atomic_write", lambda p: p.name == "checkpoint.pt"),
          "best": ("_atomic_write", lambda p: p.parent.name == "best" and p.name == "model.safetensors"),
          "final model": ("_atomic_write", lambda p: p.parent.name == "run" and p.name == "model.safetensors"),
          "log": ("_append_log", lambda p: p.name == "log.jsonl"),
          "reference cache": ("_atomic_write", lambda p: p.name == "reference.safetensors")}


@pytest.mark.parametrize("which", list(WRITES))
def test_a_full_disk_at_any_write_stops_with_one_line_and_the_folder_as_it_was(data, base_model, tmp_path,
                                                                               monkeypatch, capsys, which):
    run = tmp_path / "run"
    steps = ("--save-every", "2", "--eval-every", "2", "--lr", "1e-2")
    if which != "reference cache":  # a run to step 2, then a resume to 4 whose write fails
        train(data, base_model, run, "--steps", "2", *steps)
    before = snapshot(run) if run.exists() else {}
    name, target = WRITES[which]
    real = getattr(safeclip, name)

    def failing(path, *args):
        with file_size_limit(64) if target(Path(path)) else contextlib.nullcontext():
            return real(path, *args)

    monkeypatch.setattr(safeclip, name, failing)
    resume = ("--resume",) if before else ()
    line = main_error(argv(data, base_model, run, "--steps", "4", *steps, *resume), capsys)
    assert line.startswith("error: cannot write ") and "File too large" in line and "--resume" in line
    if before:  # (the final model is written after the last checkpoint, at step 4)
        assert f"checkpoint.pt (step {4 if which == 'final model' else 2}) is intact" in line
        if which == "log":  # the log fails at its first write: the truncation of a resume
            assert str(run / "log.jsonl") in line
    else:
        assert str(run / "reference.safetensors") in line and "no checkpoint was written yet" in line
    after = snapshot(run)
    # The file that failed is as it was (or absent), so is the checkpoint (but for the final model,
    # written after the last checkpoint), no temporary file is left
    # and the log holds whole lines only. (What was written before the failure, such as the log
    # records of steps 3-4 or a new best/, stays: a resume truncates the log to the checkpoint.)
    failed = [name for name in before if target(run / name)] or [name for name in after if target(run / name)]
    kept = failed + (["checkpoint.pt"] if which != "final model" else [])
    assert all(after.get(name) == before.get(name) for name in kept)
    assert not any(name.endswith(".tmp") for name in after)
    assert all(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()) if after else True
    if which in ("reference cache", "log"):  # the first write of the command: nothing at all changed
        assert after == before
    monkeypatch.setattr(safeclip, name, real)

    # Space freed: the same command with --resume ends where a straight run does.
    train(data, base_model, run, "--steps", "4", *steps, "--resume")
    straight = train(data, base_model, tmp_path / "straight", "--steps", "4", *steps)
    same_weights(run, straight)


def test_a_damaged_checkpoint_is_named_with_what_is_intact_and_the_ways_out(data, base_model, tmp_path, capsys):
    run = train(data, base_model, tmp_path / "run", "--steps", "2", "--save-every", "2", "--eval-every", "2")
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy cut short
    before = snapshot(run)
    line = main_error(argv(data, base_model, run, "--steps", "4", "--save-every", "2", "--eval-every", "2",
                           "--resume"), capsys)
    assert line.startswith(f"error: {ckpt}: cannot be read (") and "nothing in" in line
    assert "Intact: best, log.jsonl, train_config.json" in line
    assert "restore checkpoint.pt" in line and "another --out" in line
    assert snapshot(run) == before


def test_a_damaged_best_model_is_named_and_load_names_the_file(data, base_model, tmp_path, capsys):
    run = train(data, base_model, tmp_path / "run", "--steps", "2", "--eval-every", "1")
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(safeclip.CheckpointError, match=rf"{weights}: cannot read this file"):
        safeclip.load(run / "best")
    # The run is finished; a resume only makes its final model again, from best/: which cannot be read.
    line = main_error(argv(data, base_model, run, "--steps", "2", "--eval-every", "1", "--resume"), capsys)
    assert str(weights) in line and "checkpoint.pt (step 2) and the log are intact" in line
    assert "restore" in line and "--resume" in line


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_holder(data, base_model, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "safeclip.py"), *argv(data, base_model, run, "--steps", "400", "--eval-every",
                                                                 "1000", "--save-every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run / "log.jsonl", 2, first)
        second = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert line == (f"error: {run} is in use by another training run (process {first.pid}); nothing was "
                        "changed. Wait for it to end, or choose another --out")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # kill -9 leaves no stale lock: a resume takes the folder over.
    resumed = subprocess.run(cmd[:-6] + ["--steps", "3", "--eval-every", "1000", "--save-every", "1", "--resume"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def wait_for_step(log, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step and "loss" in r for r in _whole_records(log)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before that step"
        time.sleep(0.005)


def test_a_resume_with_other_settings_is_refused_and_one_that_extends_the_run_is_logged(data, base_model, tmp_path,
                                                                                         capsys):
    run = train(data, base_model, tmp_path / "run", "--steps", "2", "--save-every", "2", "--epochs", "3")
    before = snapshot(run)
    line = main_error(argv(data, base_model, run, "--steps", "4", "--lr", "1e-2", "--seed", "2", "--resume"), capsys)
    assert line.startswith(f"error: --resume with other settings than the run in {run}: ")
    assert "lr: 0.001 -> 0.01" in line and "seed: 1 -> 2" in line and "another --out" in line
    # The data's content, not its path: the same rows with one caption changed.
    changed = tmp_path / "changed" / "pairs.jsonl"
    changed.parent.mkdir()
    changed.write_text(data.read_text().replace("on grey", "on gray", 1))
    (changed.parent / "images").symlink_to(data.parent / "images")
    line = main_error(argv(changed, base_model, run, "--steps", "4", "--resume"), capsys)
    assert "data_sha256: " in line
    assert snapshot(run) == before
    # More steps, epochs and patience only extend the run: allowed, and logged.
    assert safeclip.main(argv(data, base_model, run, "--steps", "4", "--save-every", "2", "--epochs", "5",
                              "--patience", "2", "--resume")) == 0
    assert "epochs: 3 -> 5" in capsys.readouterr().err
    extended = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "resumed_with" in r]
    assert extended == [{"step": 2, "resumed_with": {"steps": [2, 4], "epochs": [3, 5], "patience": [5, 2]}}]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_finish_the_step_write_the_checkpoint_and_resume_exactly(data, base_model, tmp_path,
                                                                                     signum, code):
    run = tmp_path / "run"
    extra = ("--steps", "40", "--eval-every", "1000", "--lr", "1e-2")
    cmd = [sys.executable, str(ROOT / "safeclip.py"), *argv(data, base_model, run, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # as a shell starts a background job: SIGINT ignored, which the run undoes
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(run / "log.jsonl", 3, proc)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    reached = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["step"]
    steps = [r["step"] for r in _whole_records(run / "log.jsonl") if "loss" in r]
    assert 3 <= reached < 40 and steps[-1] == reached  # the checkpoint is at the step reached
    assert f"stopped by {signal.Signals(signum).name} at step {reached}" in err and "--resume" in err
    assert "Traceback" not in err and not (run / "model.safetensors").exists()
    assert subprocess.run(cmd + ["--resume"], env=env, capture_output=True).returncode == 0
    same_weights(run, train(data, base_model, tmp_path / "straight", *extra))


def test_a_second_signal_stops_at_once(data, base_model, tmp_path, monkeypatch):
    """The handler's second call restores the default action and sends the signal again."""
    args = safeclip.build_parser().parse_args(argv(data, base_model, tmp_path / "run"))
    killed = []
    monkeypatch.setattr(safeclip.os, "kill", lambda pid, signum: killed.append((pid, signum)))
    old = signal.getsignal(signal.SIGTERM)
    with safeclip.Run(args, main_process=True) as run:
        run._catch_signals()
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert run.signal == signal.SIGTERM and killed == []  # the first one waits for the step's end
        handler(signal.SIGTERM, None)
        assert killed == [(os.getpid(), signal.SIGTERM)] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == old
