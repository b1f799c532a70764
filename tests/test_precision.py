"""Mixed precision on the CPU: `--precision bf16/fp16` take the same autocast and GradScaler code a
GPU takes, so CI exercises it. Every run here is a tiny random CLIP for a few steps."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pairs, rel_err

import safeclip

torch.set_num_threads(1)

# fp16 keeps 10 bits of mantissa to bf16's 7, so its runs stay closer to float32.
MIN_COSINE = {"bf16": 0.99, "fp16": 0.999}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("data"), n=16)


@pytest.fixture(scope="module")
def model(tmp_path_factory, data):
    """A random tiny CLIP with a BPE trained on the captions: the Safe-CLIP loss starts well above
    zero (its unsafe captions sit far from the safe ones), so a few steps show it fall."""
    torch.manual_seed(0)
    rows = safeclip.read_pairs(data)
    tokenizer = safeclip.Tokenizer.train([r[k] for r in rows for k in ("safe", "unsafe")], vocab_size=600)
    config = safeclip.scratch_config(safeclip.parse_scratch(
        "width=64,layers=2,embed_dim=32,image_resolution=32,vision_patch_size=8,context_length=16"), tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("model")
    safeclip.save(safeclip.CLIP(config), folder, tokenizer=tokenizer)
    return folder


def train(data, model, out, *extra, steps=6):
    """Every step sees the whole set (one batch of 16), so losses compare from step to step."""
    argv = ["train", "--data", str(data), "--model", str(model), "--out", str(out), "--batch-size", "16",
            "--workers", "0", "--seed", "1", "--steps", str(steps), "--lr", "3e-3", "--lora-dropout", "0",
            *map(str, extra)]
    return safeclip.main(argv)


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, data, model):
    out = tmp_path_factory.mktemp("fp32")
    assert train(data, model, out, "--precision", "fp32") == 0
    return out


def poison_step(monkeypatch, *steps):
    """Make the training loss NaN at these steps (1-based), as an fp16 overflow would."""
    real, calls = safeclip.OBJECTIVES["safeclip"].loss, []

    def poisoned(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        if total.requires_grad:  # a training step, not a validation
            calls.append(1)
            if len(calls) in steps:
                return total * float("nan"), terms
        return total, terms

    monkeypatch.setitem(safeclip.OBJECTIVES, "safeclip", dataclasses.replace(safeclip.OBJECTIVES["safeclip"], loss=poisoned))


@pytest.mark.learned
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_float32(data, model, fp32_run, tmp_path, precision):
    # fp16's loss scaler starts at 2^16, which overflows the first backward: it skips that step
    # and halves the scale, so its run takes one step more to apply the same six updates.
    out = tmp_path / precision
    assert train(data, model, out, "--precision", precision, steps=7 if precision == "fp16" else 6) == 0
    records = log(out)
    assert [r.get("skipped", False) for r in records][:2] == [precision == "fp16", False]
    losses = [r["loss"] for r in records if not r.get("skipped")]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    # ... and the redirect falls with it: unsafe captions towards the safe images. Measured with
    # ATEN_CPU_CAPABILITY=default, avx2, avx512 and 1 or 2 threads, the loss fell by 1.36 to 1.43
    # and nce_text_unsafe by 1.26 to 1.37; with the redirect terms off it fell by 0.44 (bf16) or
    # rose (fp16), while the loss still fell by 1.68 (bf16).
    redirect = [r["nce_text_unsafe"] for r in records if not r.get("skipped")]
    assert redirect[-1] < redirect[0] - 0.8, redirect
    assert {r["precision"] for r in records} == {precision}
    assert {r["precision"] for r in log(fp32_run)} == {"fp32"}

    # The weights and the optimizer state stay float32 (autocast only lowers the arithmetic).
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["trainable"].values())
    assert {v.dtype for s in ckpt["optimizer"]["state"].values() for v in s.values() if v.dim()} == {torch.float32}

    # Embeddings under this precision vs the float32 run's in float32, after the same updates;
    # their gap is a small part of how far training moved them.
    rows = safeclip.read_pairs(data)
    trained, _ = safeclip.load(out)
    ids = trained.tokenizer([r[k] for r in rows for k in ("safe", "unsafe")], context_length=16)
    with torch.no_grad():
        with safeclip.autocast("cpu", precision):
            low = trained.encode_text(ids).float()
        full = safeclip.load(fp32_run)[0].encode_text(ids)
        start = safeclip.load(model)[0].encode_text(ids)
    # Measured with ATEN_CPU_CAPABILITY=default, avx2, avx512 and 1 or 2 threads: cosines of 0.9998
    # (bf16) and 0.99999 (fp16) or more; gaps of at most 0.07 (bf16) and 0.011 (fp16) of the move.
    assert F.cosine_similarity(low, full).min() >= MIN_COSINE[precision]
    assert rel_err(low, full) < 0.2 * rel_err(start, full)
    assert rel_err(low, full) > 1e-6  # autocast did run in low precision: the CPU is not silently fp32


def test_layernorm_statistics_stay_float32_under_autocast(model):
    m, _ = safeclip.load(model)
    x = torch.randn(2, 5, 64).bfloat16()
    with safeclip.autocast("cpu", "bf16"):
        y = m.ln_final(x)
    assert y.dtype == torch.bfloat16
    expected = F.layer_norm(x.float(), (64,), m.ln_final.weight, m.ln_final.bias).bfloat16()
    assert torch.equal(y, expected)  # statistics in float32, rounded once at the end


def test_fp16_resume_restores_the_loss_scaler_exactly(data, model, tmp_path, monkeypatch):
    # A NaN at step 2 halves the scale, so a resume that forgot the scaler would show it.
    poison_step(monkeypatch, 2)
    straight = tmp_path / "straight"
    assert train(data, model, straight, "--precision", "fp16") == 0
    halves = tmp_path / "halves"
    poison_step(monkeypatch, 2)
    assert train(data, model, halves, "--precision", "fp16", steps=3) == 0
    poison_step(monkeypatch)
    assert train(data, model, halves, "--precision", "fp16", "--resume") == 0

    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (straight, halves))
    # Two skips (the first step's overflow, the NaN) halved 2^16 twice; four good steps followed.
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0 ** 14
    assert a["scaler"]["_growth_tracker"] == 4
    assert [r["loss_scale"] for r in log(straight)] == [r["loss_scale"] for r in log(halves)]
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k


def test_a_nan_under_fp16_is_skipped_by_the_scaler(data, model, tmp_path, monkeypatch):
    poison_step(monkeypatch, 3)
    out = tmp_path / "run"
    assert train(data, model, out, "--precision", "fp16", "--save-every", "1") == 0
    records = log(out)
    assert [r["skipped"] for r in records] == [True, False, True, False, False, False]  # 1: the scale's overflow
    assert records[3]["loss_scale"] == records[2]["loss_scale"] / 2
    assert all(torch.isfinite(v).all() for v in torch.load(out / "checkpoint.pt", weights_only=True)["trainable"].values())
    assert (out / "model.safetensors").exists()


def test_fp16_stops_when_no_loss_scale_makes_the_steps_finite(data, model, tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, *range(1, 100))
    assert train(data, model, tmp_path / "run", "--precision", "fp16", steps=30) == 1
    assert "fp16: 20 steps in a row with non-finite gradients or loss, up to step 20" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nan_under_bf16_or_fp32_stops_the_run(data, model, tmp_path, monkeypatch, capsys, precision):
    poison_step(monkeypatch, 3)
    out = tmp_path / "run"
    assert train(data, model, out, "--precision", precision, "--save-every", "1") == 1
    assert "non-finite loss (nan) at step 2" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    assert not (out / "model.safetensors").exists()


def test_compile_on_the_cpu_gives_the_losses_of_eager(data, model, tmp_path, capsys):
    """torch.compile's CPU kernels are C++ that it builds with g++: without one this fails with a
    message saying what to install. Only the text tower trains, which halves the kernels to build
    (the compiled vision tower runs forward only): building them is most of this test's time."""
    runs = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        code = train(data, model, out, "--precision", "fp32", "--freeze", "vision", *(["--compile"] * (mode == "compiled")),
                     steps=3)
        assert code == 0, capsys.readouterr().err[-3000:]
        runs[mode] = [r["loss"] for r in log(out)]
    assert len(runs["compiled"]) == 3
    for a, b in zip(runs["compiled"], runs["eager"]):
        assert abs(a - b) <= 1e-4 * abs(b), runs


def test_compile_without_a_cpu_compiler_says_what_to_install(data, model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-g++")
    assert train(data, model, tmp_path / "run", "--compile", "--device", "cpu") == 1
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
