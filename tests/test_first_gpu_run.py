"""What the first real GPU run would meet (#31), each tried on the CPU: every torchrun rank fetching
the weights into one file; a data-loading worker's error that left the run hanging for ever; every
RuntimeError (out of memory, NCCL, the compiler) cut to one line with no traceback; and activation
memory that decides whether the README's recipe fits the card."""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clip_package_dir, make_pairs, _whole_records

import safeclip

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SCRATCH = "width=64,layers=2,embed_dim=32,image_resolution=32,vision_patch_size=8,context_length=16"


class SlowServer:
    """Serves `files` (URL path -> bytes) in 16 KiB pieces `delay` seconds apart, so that
    processes starting together overlap; counts the GET requests of each path."""

    def __init__(self, files, delay=0.004):
        self.files, self.gets = files, {}
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                state.gets[self.path] = state.gets.get(self.path, 0) + 1
                data = state.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(0, len(data), 16384):
                    self.wfile.write(data[i:i + 16384])
                    time.sleep(delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def model_server(tmp_path):
    """A small CLIP (OpenAI's vocabulary, 64-wide heads) served by name, "tiny", as OpenAI serves
    its models: the environment a subprocess needs to fetch it into tmp_path/weights."""
    torch.manual_seed(0)
    config = safeclip.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                                 vision_patch_size=8, vision_heads=1, context_length=16, text_width=64,
                                 text_heads=1, text_layers=2)
    pt = tmp_path / "tiny.pt"
    torch.save(safeclip._plain_state_dict(safeclip.CLIP(config)), pt)
    weights, vocab = pt.read_bytes(), (clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    files = {f"/{sha}/tiny.pt": weights, f"/{safeclip.VOCAB_FILE}": vocab}
    with SlowServer(files) as server:
        (tmp_path / "models.json").write_text(json.dumps({"tiny": f"{server.url}/{sha}/tiny.pt"}))
        server.env = {**os.environ, "SAFECLIP_MODELS": str(tmp_path / "models.json"), "SAFECLIP_BASE_URL": server.url,
                      "SAFECLIP_WEIGHTS": str(tmp_path / "weights"), "no_proxy": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        server.weights_path = f"/{sha}/tiny.pt"
        yield server


# -- 1. one download per machine ----------------------------------------------------------------


def test_four_torchrun_ranks_fetch_the_weights_once_and_all_train(model_server, tmp_path):
    """Bug: every rank fetched into the same .part file; the first to finish renamed it and the
    others died with FileNotFoundError (or each downloaded it again)."""
    data = make_pairs(tmp_path / "data", n=16)
    proc = subprocess.run([*TORCHRUN, "--nproc_per_node=4", str(ROOT / "safeclip.py"), "train", "--model", "tiny",
                           "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "8", "--steps", "2",
                           "--workers", "0"], env=model_server.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model_server.gets == {model_server.weights_path: 1, f"/{safeclip.VOCAB_FILE}": 1}
    assert [r["step"] for r in _whole_records(tmp_path / "run" / "log.jsonl") if "loss" in r] == [1, 2]
    # Hashed once: the stamp that spares later ranks and runs the 890 MB of ViT-L/14.
    weights = tmp_path / "weights" / "tiny.pt"
    stamp = (tmp_path / "weights" / ".tiny.pt.sha256").read_text().split()
    assert stamp == [model_server.weights_path.split("/")[1], str(weights.stat().st_size), str(weights.stat().st_mtime_ns)]


def test_two_jobs_on_one_weights_folder_wait_for_each_other(model_server):
    """Two independent processes (two jobs) sharing weights/: one fetches, the other waits for it."""
    cmd = [sys.executable, str(ROOT / "safeclip.py"), "download", "tiny"]
    procs = [subprocess.Popen(cmd, env=model_server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert model_server.gets == {model_server.weights_path: 1, f"/{safeclip.VOCAB_FILE}": 1}
    assert any("waiting for it" in e for e in errs), errs


def test_a_verified_file_is_not_hashed_again_unless_it_changed(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    hashed = []
    real = safeclip.sha256_file
    monkeypatch.setattr(safeclip, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert safeclip.verified(path, sha) and safeclip.verified(path, sha) and len(hashed) == 1
    path.write_bytes(b"WEIGHTS" * 1000)  # same size, new content: the stamp no longer holds
    assert not safeclip.verified(path, sha) and len(hashed) == 2


# -- 2. a worker's error ends the run ------------------------------------------------------------


@pytest.mark.parametrize("launch", ["workers0", "workers2", "torchrun-workers2"])
def test_an_image_that_vanishes_mid_run_ends_it_with_one_line(tmp_path, launch):
    """Bug: with data-loading workers the run printed the worker's traceback and never exited (the
    workers ignore SIGTERM, and the interpreter's exit waited on them)."""
    data = make_pairs(tmp_path / "data", n=64)
    out = tmp_path / "run"
    args = [str(ROOT / "safeclip.py"), "train", "--objective", "clip", "--scratch", SCRATCH, "--vocab-size", "600",
            "--data", str(data), "--out", str(out), "--batch-size", "8", "--epochs", "20", "--save-every", "1",
            "--workers", "0" if launch == "workers0" else "2"]
    cmd = [*TORCHRUN, "--nproc_per_node=2", *args] if launch.startswith("torchrun") else [sys.executable, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not any(r.get("step") == 2 and "loss" in r for r in _whole_records(out / "log.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.05)
        for image in (tmp_path / "data" / "images").iterdir():
            image.unlink()
        gone = time.monotonic()
        err = proc.communicate(timeout=90)[1]  # on the old code: never, with workers
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and time.monotonic() - gone < 90
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    ranks = 2 if launch.startswith("torchrun") else 1  # (each rank that meets it says so, in one line)
    assert 1 <= len(errors) <= ranks, err[-2000:]
    assert all(re.search(r"pairs\.jsonl:\d+: .*\.png: unreadable image", e) for e in errors), err[-2000:]
    if not launch.startswith("torchrun"):  # (torchrun adds its own report of the failed rank)
        assert proc.returncode == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # the last checkpoint is whole
    assert ckpt["state"]["step"] >= 2


# -- 3. the user's errors are one line; anything else keeps its traceback ------------------------

FAIL_IN_BACKWARD = """
import sys, torch
sys.path.insert(0, {root!r})
import safeclip

class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise {error}

calls, clip_loss = [], safeclip.clip_loss
def failing_clip_loss(*args):
    loss = clip_loss(*args)
    if loss.requires_grad:
        calls.append(1)
    return FailInBackward.apply(loss) if len(calls) == 3 else loss

safeclip.clip_loss = failing_clip_loss
sys.exit(safeclip.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("error,expect", [
    ("torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')",
     [r"torch\.OutOfMemoryError: CUDA out of memory", r"error: out of memory at step 3 with --batch-size 8",
      r"--grad-checkpointing", r"--batch-size 4 --accum 2", r"docs/training\.md"]),
    ("RuntimeError('NCCL error: unhandled system error')",
     [r"RuntimeError: NCCL error: unhandled system error", r"error: at step 3\."]),
])
def test_an_error_in_backward_keeps_its_traceback_and_says_what_is_intact(tmp_path, error, expect):
    """Bug: `main` turned every RuntimeError into one line: "error: CUDA out of memory. Tried to
    allocate 2.00 GiB", and nothing else."""
    data = make_pairs(tmp_path / "data", n=32)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FAIL_IN_BACKWARD.format(root=str(ROOT), error=error), "train",
                           "--objective", "clip", "--scratch", SCRATCH, "--vocab-size", "600", "--data", str(data),
                           "--out", str(out), "--batch-size", "8", "--epochs", "3", "--save-every", "2",
                           "--workers", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in backward" in proc.stderr, proc.stderr[-3000:]
    for pattern in expect + [rf"The checkpoint {re.escape(str(out / 'checkpoint.pt'))} \(step 2\) is intact",
                             r"--resume"]:
        assert re.search(pattern, proc.stderr), (pattern, proc.stderr[-3000:])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 2


def test_the_users_errors_stay_one_line(tmp_path, capsys):
    data = make_pairs(tmp_path / "data", n=20)
    argv = ["train", "--objective", "clip", "--scratch", SCRATCH, "--data", str(data), "--out", str(tmp_path / "r"),
            "--batch-size", "64", "--workers", "0"]
    assert safeclip.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")


# -- 4. memory you can plan ----------------------------------------------------------------------


def saved_tensors(model, run):
    """(dtype, shape, bytes) of each distinct storage autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = (t.dtype, tuple(t.shape), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), safeclip.autocast("cpu", "bf16"):
        run(model)
    return list(kept.values())


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    model = safeclip.CLIP(safeclip.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64,
                                              vision_patch_size=8, vision_heads=2, context_length=16,
                                              vocab_size=1000, text_width=64, text_heads=2, text_layers=2))
    safeclip.add_lora(model)
    return model.train()


def test_each_adapter_input_is_dropped_out_once(lora_model):
    """Bug: the key and value adapters read the same input and each drew (and kept) a dropout mask
    and a dropped copy of it: five dropouts a block where four inputs feed adapters."""
    calls = []
    hooks = [a.dropout.register_forward_hook(lambda *_: calls.append(1)) for a in safeclip.lora_modules(lora_model).values()]
    try:
        saved_tensors(lora_model, lambda m: m.encode_image(torch.randn(2, 3, 32, 32)))
    finally:
        for h in hooks:
            h.remove()
    # ln_1 (keys and values), the attention's output, ln_2, the GELU; and the patches
    assert len(calls) == 4 * lora_model.config.vision_layers + 1


def test_no_float32_copies_in_the_bf16_vision_tower(lora_model):
    """Bug: LayerNorm cast its bf16 input to float32 and kept that copy for backward (about an
    eighth of ViT-L/14's activations)."""
    saved = saved_tensors(lora_model, lambda m: m.encode_image(torch.randn(2, 3, 32, 32)))
    tokens, width = 17, 64
    big_fp32 = [s for s in saved if s[0] == torch.float32 and s[2] >= 2 * tokens * width * 4]
    assert big_fp32 == [], big_fp32


def test_the_memory_script_counts_what_autograd_keeps(lora_model, monkeypatch, capsys):
    """benchmarks/activation_memory.py's figure per image is the difference between two forward
    passes' saved bytes, which these hooks count independently."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("activation_memory", ROOT / "benchmarks" / "activation_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The script's command line, run by its main() in this process (not a second start of Python
    # and torch); its figures are its printed JSON, as before.
    monkeypatch.setattr(sys, "argv", ["activation_memory.py", "--models", "tiny", "--json", "-"])
    script.main()
    stdout = capsys.readouterr().out
    measured = json.loads(stdout[stdout.index("["):])[0]
    torch.manual_seed(0)
    model = safeclip.CLIP(safeclip.CLIPConfig(**script.MODELS["tiny"]))
    safeclip.add_lora(model)
    model.train()
    count = lambda n: sum(s[2] for s in saved_tensors(model, lambda m: m.encode_image(torch.randn(n, 3, 32, 32))))
    assert measured["image"] == count(3) - count(2) > 0
    # The table's batch sizes follow from these figures; more memory never fits fewer rows.
    fits = [script.largest_batch(measured, gib, False) for gib in script.GPUS_GIB]
    assert fits == sorted(fits) and fits[0] > 0


def test_the_recipes_fit_an_80_gb_gpu_by_the_table():
    """The README's and docs' ViT-L/14 commands, single process, against docs/training.md's table."""
    doc = (ROOT / "docs" / "training.md").read_text()
    table = doc.split("<!-- activation-memory:begin -->")[1].split("<!-- activation-memory:end -->")[0]
    header = [c.strip() for c in table.strip().splitlines()[0].strip("|").split("|")]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in table.strip().splitlines()[2:])}
    fits = {name: int(rows[name][header.index("80 GB")]) for name in ("L/14", "L/14 --grad-checkpointing")}
    recipes = [line for path in ("README.md", "docs/data.md", "docs/training.md")
               for line in (ROOT / path).read_text().replace("\\\n", " ").splitlines()
               if "safeclip.py train" in line and "ViT-L" in line and "--batch-size" in line]
    assert recipes
    for line in recipes:
        batch = int(re.search(r"--batch-size (\d+)", line).group(1))
        both_towers = "--freeze" not in line  # a frozen vision tower keeps no image activations
        limit = fits["L/14 --grad-checkpointing" if "--grad-checkpointing" in line else "L/14"]
        assert not both_towers or batch <= limit, line
