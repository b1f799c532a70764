"""`train --report-to tensorboard`: TensorBoard's own reader finds every number of log.jsonl, for a
straight run and for one killed and resumed, with no step twice; without the package, one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_killed_after_step
from test_train import base_model, data  # noqa: F401  (fixtures)

import safeclip

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def curves(out):
    """{tag: [(step, value)]} as TensorBoard reads OUT/tensorboard."""
    acc = event_accumulator.EventAccumulator(str(Path(out) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(out):
    """The same curves, from log.jsonl."""
    want = {}
    for record in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()):
        section, values = ("train", record) if "loss" in record else ("val", record.get("val", {}))
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("step", "epoch"):
                want.setdefault(f"{section}/{name}", []).append((record["step"], value))
    return want


def same(got, want):
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # every step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag


def argv(data, model, out, steps=8):
    return ["train", "--data", str(data), "--model", str(model), "--out", str(out), "--batch-size", "8",
            "--workers", "0", "--seed", "1", "--steps", str(steps), "--eval-every", "3", "--log-every", "2",
            "--save-every", "4", "--report-to", "tensorboard"]


def test_every_number_of_the_log_reaches_tensorboard(data, base_model, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert safeclip.main(argv(data, base_model, out)) == 0
    got = curves(out)
    same(got, expected(out))
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/nce_text_unsafe", "val/loss",
            "val/recall_sum"} <= got.keys()
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))


def test_a_killed_and_resumed_run_continues_the_curves_with_no_step_twice(data, base_model, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "safeclip.py"), *argv(data, base_model, out, steps=12)]
    # Killed once the log holds step 7: TensorBoard has its curves to step 6 at least (flushed with
    # steps 5-6), past the last checkpoint (step 4) or at the next one (step 8).
    assert run_killed_after_step(cmd, out / "log.jsonl", 7) == -9
    assert max(s for s, _ in curves(out)["train/loss"]) >= 6
    assert safeclip.main(argv(data, base_model, out, steps=12) + ["--resume"]) == 0
    got = curves(out)
    same(got, expected(out))
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))


def test_without_the_package_one_line_and_nothing_written(data, base_model, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    hide = "import sys; sys.modules['torch.utils.tensorboard'] = None\n"
    proc = subprocess.run([sys.executable, "-c", hide + f"sys.path.insert(0, {str(ROOT)!r}); import safeclip; "
                           f"sys.exit(safeclip.main({[str(a) for a in argv(data, base_model, out)]!r}))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: --report-to tensorboard needs the tensorboard package: "
                                                   "pip install tensorboard (requirements-extras.txt)")
    assert not out.exists() or not any(out.iterdir())


def test_a_resume_within_the_same_second_still_purges_after_the_killed_runs_file(tmp_path):
    """Bug (seen in CI): TensorBoard reads event files in name order, which starts with the second a
    file was opened and then the process id; a run killed within a second of its start, resumed at
    once by a process whose id sorts first, had its curves read before the killed run's, and the
    purge hid the wrong steps."""
    folder = tmp_path / "tensorboard"
    first = safeclip.TensorBoard(folder, first_step=1)
    for step in range(1, 7):
        first.add({"step": step, "loss": float(step)})
    first.writer.close()
    [killed] = folder.glob("events.out.tfevents.*")
    second_and_host = killed.name.rsplit(".", 2)[0]  # events.out.tfevents.SECOND.HOST(.PID.N)
    killed.rename(folder / f"{second_and_host}.{'9' * 12}.0")  # a process id that sorts after any other
    resumed = safeclip.TensorBoard(folder, first_step=5)
    for step in range(5, 9):
        resumed.add({"step": step, "loss": 10.0 + step})
    resumed.writer.close()
    got = curves(tmp_path)["train/loss"]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]
