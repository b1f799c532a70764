"""torchrun: two CPU processes (gloo) with the global batch split between them train to the same
loss and weights as one process with the whole batch, because the InfoNCE negatives and the
distance terms are gathered from all ranks before the loss."""

import json
import os
import socket
import subprocess
import sys

import torch
from conftest import ROOT
from test_train import base_model, data  # noqa: F401  (fixtures)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(data, base_model, tmp_path):  # noqa: F811
    args = ["train", "--data", str(data), "--model", str(base_model), "--batch-size", "8", "--workers", "0",
            "--steps", "4", "--lr", "1e-2", "--lora-dropout", "0", "--eval-every", "2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "safeclip.py"), *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "safeclip.py"),
                             *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): where a gradient is ~0 it magnifies the float32 rounding of the
        # different reduction order, so a few values differ by up to ~1e-5 (an update is ~1e-2).
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5), k
        assert (a[k] - b[k]).abs().median() < 1e-6, k
    assert a[k].abs().max() > 0  # training did change the adapters
    # Only rank 0 wrote: one log line per step, one final model.
    assert (tmp_path / "two" / "model.safetensors").exists()
