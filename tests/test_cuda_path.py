"""The CUDA and multi-GPU path, checked where CI can: on the CPU, with CUDA faked where a test needs
its API, and with two gloo processes under torchrun.

- `--device cuda` means cuda:LOCAL_RANK (torch.cuda.set_device refuses a device without index);
- decisions that depend on what one process sees (the reference cache, the checkpoint, a
  validation result) are rank 0's for every rank, or a rank would skip a collective and NCCL hang;
- each rank draws its own dropout masks, and a resume restores every rank's generators;
- a training step reads nothing back from the device but once per --log-every steps;
- validation runs at --precision, and float32 (the references, --precision fp32) is true float32;
- the compiled text tower has no graph break (the padding is trimmed before compiled code)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_train import base_model, data, train, trainable_state  # noqa: F401  (fixtures)

import safeclip


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a one-process-per-GPU node, as far as set-up goes: set_device records its
    device and, as the real one does, refuses a device without an index."""
    chosen = []

    def set_device(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        chosen.append(torch.device(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return chosen


def parse(*extra):
    return safeclip.build_parser().parse_args(["train", "--data", "pairs.jsonl", *extra])


@pytest.mark.parametrize("requested,expected", [("cuda", "cuda:1"), (None, "cuda:1"), ("cuda:0", "cuda:0")])
def test_cuda_means_this_processs_gpu_and_fp32_means_no_tf32(fake_cuda, monkeypatch, requested, expected):
    monkeypatch.setenv("LOCAL_RANK", "1")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, tf32 in (("fp32", False), ("bf16", True)):
            args = parse(*(["--device", requested] if requested else []), "--precision", precision)
            assert safeclip.setup_device(args) == torch.device(expected)
            assert fake_cuda[-1] == torch.device(expected)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_references_are_true_float32_and_validation_runs_at_the_training_precision(data, base_model, tmp_path,
                                                                                 monkeypatch):
    seen = {"reference": set(), "validate": set()}
    real_texts, real_ids, real_validate = safeclip.encode_texts, safeclip.encode_token_ids, safeclip.validate
    state = {"in": "reference"}

    def encode_texts(*args, **kwargs):  # the references' encoder
        seen["reference"].add(torch.backends.cuda.matmul.allow_tf32)
        return real_texts(*args, **kwargs)

    def encode_token_ids(*args, **kwargs):  # validation's
        if state["in"] == "validate":
            seen["validate"].add(kwargs.get("precision"))
        return real_ids(*args, **kwargs)

    def validate(*args, **kwargs):
        state["in"] = "validate"
        try:
            return real_validate(*args, **kwargs)
        finally:
            state["in"] = None

    monkeypatch.setattr(safeclip, "encode_texts", encode_texts)
    monkeypatch.setattr(safeclip, "encode_token_ids", encode_token_ids)
    monkeypatch.setattr(safeclip, "validate", validate)
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as CUDA set-up leaves it for bf16
    try:
        train(data, base_model, tmp_path / "run", "--steps", "2", "--eval-every", "1", "--precision", "bf16")
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored after the references
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    assert seen == {"reference": {False}, "validate": {"bf16"}}


def test_a_step_reads_the_device_once_per_log_interval(data, base_model, tmp_path, monkeypatch):
    """Counts the reads of computed values (float or bool tensors: losses, terms, finiteness) back to
    the host (item, tolist, float, bool) made by the training loop's own code; on CUDA each is a
    sync that stalls the GPU's queue. Index lists (int64, host data) and torch's own reads (the
    optimizer's) are not the loop's and are not counted."""
    step_code = {"train", "forward_backward", "accumulate", "batch_loss", "update", "after_step", "flush",
                 "log_step", "check_finite", "evaluate_and_select", "save_checkpoint"}
    reads = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if (caller.co_filename == safeclip.__file__ and caller.co_name in step_code
                    and (self.is_floating_point() or self.dtype == torch.bool)):
                reads.append(caller.co_name)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    out = train(data, base_model, tmp_path / "run", "--steps", "8", "--log-every", "4", "--eval-every", "100")
    monkeypatch.undo()
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) and set(safeclip.LAMBDAS) <= set(steps[0])
    assert len(reads) <= 8 // 4 + 1, reads  # one read per 4 steps (and one more at the end at most)


def test_the_compiled_towers_have_no_graph_break(base_model):
    model, preprocess = safeclip.load(base_model)
    towers = safeclip.Towers(model)
    ids = safeclip.trim_padding(model.tokenizer(["a red square on grey", "a blue circle on grey splashed with blood"],
                                                context_length=model.config.context_length))
    assert ids.shape[1] % 8 == 0
    pixels = torch.randn(2, 3, model.config.image_resolution, model.config.image_resolution)
    explained = torch._dynamo.explain(towers)(ids, pixels)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    # Trimmed to a multiple of 8, the embeddings are the untrimmed ones.
    full = model.tokenizer(["a red square on grey", "a blue circle on grey splashed with blood"],
                           context_length=model.config.context_length)
    with torch.no_grad():
        assert torch.allclose(towers(ids, pixels)[0], towers(full, pixels)[0], atol=1e-6)


def test_compile_with_grad_checkpointing_under_torchrun_is_refused_up_front(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--compile with --grad-checkpointing under torchrun is not supported"):
        safeclip.main(["train", "--data", "pairs.jsonl", "--compile", "--grad-checkpointing"])


def torchrun(*args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rank_view.py"), *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=180)


def test_every_rank_takes_rank_0s_decisions_and_its_own_dropout(data, base_model, tmp_path):
    """Rank 1 sees no reference cache and no checkpoint (another node's disk) and a validation loss
    that only rises; it must still resume, stop and step exactly as rank 0 says. With LoRA dropout,
    the two ranks draw different masks, and the resumed run equals the straight one."""
    common = ["train", "--data", data, "--model", base_model, "--workers", "0", "--batch-size", "8", "--seed", "3",
              "--lr", "1e-2", "--eval-every", "1", "--patience", "2", "--save-every", "1"]
    straight = torchrun(*common, "--steps", "5", "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(*common, "--steps", "2", "--out", tmp_path / "halves")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2 and not torch.equal(ckpt["rng_ranks"][0][0], ckpt["rng_ranks"][1][0])
    resumed = torchrun(*common, "--steps", "5", "--out", tmp_path / "halves", "--resume",
                       env={"HIDE_FROM_RANK1": "reference.safetensors,checkpoint.pt", "WORSE_VAL_ON_RANK1": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = lambda run: [r for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())]
    assert [r["step"] for r in log("halves") if "loss" in r] == [r["step"] for r in log("straight") if "loss" in r]
    a, b = trainable_state(tmp_path / "straight"), trainable_state(tmp_path / "halves")
    for k in a:
        assert torch.equal(a[k], b[k]), k
