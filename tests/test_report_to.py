"""`train --report-to tensorboard` and `--report-to wandb`: TensorBoard's own reader, and W&B's own
record schema on its offline files, find every number of log.jsonl, for a straight run and for one
stopped and resumed, with no step twice; without the package, one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_killed_after_step
from test_long_runs import wait_for_step
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


@pytest.mark.parametrize("package,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_without_the_package_one_line_and_nothing_written(data, base_model, tmp_path, package, module):  # noqa: F811
    out = tmp_path / "run"
    hide = f"import sys; sys.modules[{module!r}] = None\n"
    args = [a if a != "tensorboard" else package for a in argv(data, base_model, out)]
    proc = subprocess.run([sys.executable, "-c", hide + f"sys.path.insert(0, {str(ROOT)!r}); import safeclip; "
                           f"sys.exit(safeclip.main({[str(a) for a in args]!r}))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --report-to {package} needs the {package} package: "
                                                   f"pip install {package} (requirements-extras.txt)")
    assert not out.exists()


def test_a_resume_within_the_same_second_still_purges_after_the_killed_runs_file(tmp_path):
    """Bug (seen in CI): TensorBoard reads event files in name order, which starts with the second a
    file was opened and then the process id; a run killed within a second of its start, resumed at
    once by a process whose id sorts first, had its curves read before the killed run's, and the
    purge hid the wrong steps."""
    folder = tmp_path / "tensorboard"
    first = safeclip.TensorBoard(tmp_path, first_step=1)
    for step in range(1, 7):
        first.add({"step": step, "loss": float(step)})
    first.writer.close()
    [killed] = folder.glob("events.out.tfevents.*")
    second_and_host = killed.name.rsplit(".", 2)[0]  # events.out.tfevents.SECOND.HOST(.PID.N)
    killed.rename(folder / f"{second_and_host}.{'9' * 12}.0")  # a process id that sorts after any other
    resumed = safeclip.TensorBoard(tmp_path, first_step=5)
    for step in range(5, 9):
        resumed.add({"step": step, "loss": 10.0 + step})
    resumed.writer.close()
    got = curves(tmp_path)["train/loss"]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]


# -- W&B --------------------------------------------------------------------------------------------


def wandb_records(path):
    """The records of a W&B run file (OUT/wandb/offline-run-*/run-ID.wandb), parsed with W&B's own
    record schema. The file is LevelDB's log format behind a 7-byte header (":W&B", a magic, a
    version): 32 KiB blocks, counted from the file's start, of chunks that never straddle a block,
    each a 7-byte header (checksum, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)
    and its bytes; a block's tail too short for a header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, pieces, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zeros: the rest of the block is padding
            pos += -pos % block
        elif kind in (1, 2):
            pieces = chunk
        else:
            pieces += chunk
        if kind in (1, 4):
            yield Record.FromString(pieces)


def finished_records(path, timeout=60.0):
    """The records of a W&B run file once it holds the run's exit record. `run.finish()` returns before
    W&B's service (a process of its own) has written the file's tail: on a loaded machine a file read
    at once can lack the run's history (seen in CI). So the file is read again until it is whole, for
    at most `timeout` seconds; then what it holds is returned, for the assertions to judge."""
    from google.protobuf.message import DecodeError  # (W&B's record schema is protobuf; W&B pulls it in)
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
        except DecodeError:  # a record cut off mid-write: read again
            records = None
        if records is not None and any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            return records or list(wandb_records(path))
        time.sleep(0.1)


def wandb_curves(out, killed=()):
    """{tag: [(step, value)]} from every W&B run file under OUT/wandb, in the order they were written
    (a killed run's, then its resumption's). Each file is read once W&B has finished it, but for the
    parts (OUT/wandb/N) in `killed`, whose run was killed and never will be."""
    files = sorted(Path(out, "wandb").glob("*/wandb/offline-run-*/run-*.wandb"), key=lambda p: int(p.parts[-4]))
    got = {}
    for path in files:
        killed_run = int(path.parts[-4]) in killed
        for record in (wandb_records(path) if killed_run else finished_records(path)):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for key, value in items.items():
                    if key != "step" and not key.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                        got.setdefault(key, []).append((items["step"], value))
    return got


def wandb_argv(data, model, out, steps=8):
    return [a if a != "tensorboard" else "wandb" for a in argv(data, model, out, steps)]


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine; the run is written to OUT/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")


def same_but_speed(got, want):
    """`same`, but samples/s only by its steps: a resumed run's speed is its own."""
    assert got.keys() == want.keys()
    same({k: v for k, v in got.items() if k != "train/samples_per_s"},
         {k: v for k, v in want.items() if k != "train/samples_per_s"})
    assert [s for s, _ in got["train/samples_per_s"]] == [s for s, _ in want["train/samples_per_s"]]


def test_every_number_of_the_log_reaches_wandb(data, base_model, tmp_path, wandb_offline):  # noqa: F811
    out = tmp_path / "run"
    assert safeclip.main(wandb_argv(data, base_model, out)) == 0
    got = wandb_curves(out)
    same(got, expected(out))
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/nce_text_unsafe", "val/loss",
            "val/recall_sum"} <= got.keys()
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))
    assert len(list((out / "wandb").glob("*/wandb/offline-run-*/run-*.wandb"))) == 1


def stopped_then_resumed(data, base_model, out, stop):  # noqa: F811
    """Train 12 steps, stopped by `stop(proc)` once the log holds step 7, then resumed in this
    process; returns the last step the stopped run sent (OUT/wandb/last_step). The stopped run has a W&B service of its own, as a run of
    its own would have (not this process's, which W&B's environment variable would hand down)."""
    cmd = [sys.executable, str(ROOT / "safeclip.py"), *wandb_argv(data, base_model, out, steps=12)]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "log.jsonl", 7, proc)
    stop(proc)
    proc.communicate(timeout=120)
    run_id = (out / "wandb" / "run_id").read_text()
    sent = int((out / "wandb" / "last_step").read_text())
    assert safeclip.main(wandb_argv(data, base_model, out, steps=12) + ["--resume"]) == 0
    files = list((out / "wandb").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}  # one W&B run, continued
    return sent


def test_a_run_stopped_by_sigterm_and_resumed_continues_the_wandb_run_with_every_step_once(data, base_model,  # noqa: F811
                                                                                          tmp_path, wandb_offline):
    out = tmp_path / "run"
    stopped_then_resumed(data, base_model, out, lambda proc: proc.send_signal(signal.SIGTERM))
    got = wandb_curves(out)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    same_but_speed(got, expected(out))


def test_a_killed_and_resumed_run_never_sends_a_step_twice(data, base_model, tmp_path, wandb_offline):  # noqa: F811
    out = tmp_path / "run"
    sent = stopped_then_resumed(data, base_model, out, lambda proc: proc.send_signal(signal.SIGKILL))
    got, want = wandb_curves(out, killed={1}), expected(out)
    steps = [s for s, _ in got["train/loss"]]
    # W&B's service writes its file in blocks: what it held when its run was killed is lost with it
    # (here, a few steps in, all of it). The resumed run sends what follows the last step the killed
    # one sent, never a step twice; with the numbers of the resumed run's log, which the steps the
    # killed one trained past its checkpoint equal (exact resume).
    assert steps == sorted(set(steps))
    assert sent >= 6 and set(range(sent + 1, 13)) <= set(steps)
    kept = lambda curves: {tag: [(s, v) for s, v in points if s in steps] for tag, points in curves.items()}
    same_but_speed(kept(got), kept(want))


def test_a_resumed_wandb_reporter_skips_the_steps_the_killed_run_sent_past_its_checkpoint(tmp_path, wandb_offline):
    """A run that sent steps 1-6 and was killed with its checkpoint at step 4: its resumption (first
    step 5) trains steps 5-6 again and must not send them twice."""
    killed = safeclip.WandB(tmp_path, first_step=1, settings={})
    for step in range(1, 7):
        killed.add({"step": step, "loss": float(step)})
        if step % 2 == 0:
            killed.flush()
    killed.run.finish()  # what it sent reached its file (a SIGKILL may lose W&B's unwritten tail)
    resumed = safeclip.WandB(tmp_path, first_step=5, settings={})
    for step in range(5, 9):
        resumed.add({"step": step, "loss": 10.0 + step})
        resumed.add({"step": step, "val": {"loss": 20.0 + step}} if step == 6 else {"step": step, "resumed_with": {}})
    resumed.close()
    got = wandb_curves(tmp_path)
    assert got["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0), (7, 17.0), (8, 18.0)]
    assert "val/loss" not in got  # step 6 was sent, validation included
    fresh = safeclip.WandB(tmp_path / "fresh", first_step=1, settings={})  # a new run sends from step 1
    fresh.add({"step": 3, "val": {"loss": 1.5}})
    fresh.close()
    assert wandb_curves(tmp_path / "fresh") == {"val/loss": [(3, 1.5)]}
