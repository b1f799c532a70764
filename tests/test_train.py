"""The training loop: its data checks, the frozen references, LoRA, resume, failure handling and
export. Every run here is a tiny CLIP on a few dozen drawn quadruplets."""

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_pairs, rel_err, run_killed_after_step

import safeclip

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("data"), n=48, splits=("train", "train", "train", "val"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, data):
    """A small CLIP pre-trained from scratch on the safe and unsafe pairs with CLIP's own objective
    (so, like the real CLIP, it links unsafe captions to unsafe images), with a BPE trained on the
    captions."""
    return pretrain_small_clip(data, tmp_path_factory.mktemp("base"))


def pretrain_small_clip(data, folder):
    """`--objective clip` from scratch on `data`: a 2-layer CLIP with its own BPE, in `folder`."""
    argv = ["train", "--objective", "clip", "--data", str(data), "--out", str(folder), "--batch-size", "8",
            "--scratch", "width=64,layers=2,embed_dim=32,image_resolution=32,vision_patch_size=8,context_length=16",
            "--vocab-size", "600", "--epochs", "10", "--lr", "2e-3", "--workers", "0", "--seed", "1"]
    assert safeclip.main(argv) == 0
    return folder


def train(data, model, out, *extra):
    argv = ["train", "--data", str(data), "--model", str(model), "--out", str(out), "--batch-size", "8",
            "--workers", "0", "--seed", "1", *map(str, extra)]
    assert safeclip.main(argv) == 0
    return out


def first_step(out):
    """The log record of a run's first step (the line before it says which terms are active)."""
    return next(r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if "loss" in r)


def trainable_state(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["trainable"]


# -- data --------------------------------------------------------------------------------------


def test_pairs_are_read_with_aliases_relative_paths_and_default_split(tmp_path):
    path = make_pairs(tmp_path, n=3, aliases=True)
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    del row["split"]
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    rows = safeclip.read_pairs(path)
    assert len(rows) == 3 and rows[0]["split"] == "train" and rows[0]["line"] == 1
    assert rows[0]["unsafe"].endswith("splashed with blood")
    assert Path(rows[0]["unsafe_image"]).is_absolute() and Path(rows[0]["unsafe_image"]).exists()


@pytest.mark.parametrize("bad_line,problem", [
    ("{not json", "Expecting property name"),
    ('{"safe": "x", "unsafe": "y", "unsafe_image": "images/0_safe.png"}', "missing or empty field 'safe_image'"),
    ('{"safe": "x", "unsafe": "y", "safe_image": "images/0_safe.png", "unsafe_image": "nope.png"}', "nope.png does not exist"),
    ('{"safe": "x", "unsafe": "y", "safe_image": "images/0_safe.png", "unsafe_image": "images/0_safe.png", "split": "dev"}', "split 'dev'"),
    ('["a", "list"]', "expected a JSON object"),
])
def test_a_bad_line_stops_with_file_line_and_problem(tmp_path, bad_line, problem):
    path = make_pairs(tmp_path, n=4)
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(safeclip.DataError, match=f"pairs.jsonl:3: .*{problem}"):
        safeclip.read_pairs(path)
    assert len(safeclip.read_pairs(path, skip_bad=True)) == 4 and safeclip.read_pairs.skipped == 1


def test_an_unreadable_image_stops_training_before_the_first_step(tmp_path, base_model, capsys):
    path = make_pairs(tmp_path, n=20)
    (tmp_path / "images" / "5_unsafe.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    argv = ["train", "--data", str(path), "--model", str(base_model), "--out", str(tmp_path / "run"),
            "--batch-size", "8", "--workers", "0"]
    assert safeclip.main(argv) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:6: unreadable unsafe_image" in err and "5_unsafe.png" in err
    assert not (tmp_path / "run" / "log.jsonl").exists() or (tmp_path / "run" / "log.jsonl").read_text() == ""
    # --skip-bad drops that row and says so at the end.
    assert safeclip.main(argv + ["--skip-bad", "--steps", "1"]) == 0
    assert "skipped 1 bad row" in capsys.readouterr().err


# -- references and LoRA ----------------------------------------------------------------------------


def test_lora_starts_as_the_original_model_and_merges_back_exactly(base_model):
    model, _ = safeclip.load(base_model)
    ids = model.tokenizer(["a red circle on grey", "a blue bar"], context_length=16)
    pixels = torch.randn(2, 3, 32, 32)
    before = model.encode_text(ids), model.encode_image(pixels)
    params = safeclip.add_lora(model, rank=4, alpha=8, dropout=0.0)
    after = model.encode_text(ids), model.encode_image(pixels)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # B = 0 at step 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora" not in n)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)  # make every adapter do something
    adapted = model.encode_text(ids), model.encode_image(pixels)
    (adapted[0].sum() + adapted[1].sum()).backward()
    names = safeclip.lora_modules(model)
    assert len(names) == 2 * 5 * 2 + 1  # 2 towers x 2 blocks x (k, v, out, fc, proj) + patch embedding
    for name, adapter in names.items():
        assert adapter.A.grad is not None and adapter.A.grad.abs().sum() > 0, name
    merged = safeclip.CLIP(model.config)
    merged.load_state_dict(safeclip._plain_state_dict(model))
    assert rel_err(merged.encode_text(ids), adapted[0]) < 1e-5
    assert rel_err(merged.encode_image(pixels), adapted[1]) < 1e-5
    assert rel_err(adapted[1], before[1]) > 1e-3  # the patch-embedding and block adapters are live


def test_references_come_from_the_original_weights_and_never_move(data, base_model, tmp_path):
    out = train(data, base_model, tmp_path / "run", "--steps", "4", "--lr", "1e-2")
    cache = safeclip.load_safetensors(str(out / "reference.safetensors"))
    rows = [r for r in safeclip.read_pairs(data) if r["split"] in ("train", "val")]
    rows = [r for r in rows if r["split"] == "train"] + [r for r in rows if r["split"] == "val"]
    base, preprocess = safeclip.load(base_model)
    t0 = safeclip.encode_texts(base, [r["safe"] for r in rows])
    v0 = safeclip.encode_images(base, preprocess, [r["safe_image"] for r in rows])
    assert rel_err(cache["t_ref"], t0) < 1e-6 and rel_err(cache["v_ref"], v0) < 1e-6
    trained, _ = safeclip.load(out)
    assert rel_err(safeclip.encode_texts(trained, [r["safe"] for r in rows]), t0) > 1e-4  # the model did move
    # A second run on the same data reuses the cache instead of recomputing.
    mtime = (out / "reference.safetensors").stat().st_mtime_ns
    train(data, base_model, out, "--steps", "6", "--lr", "1e-2", "--resume")  # (a resume keeps the run's lr)
    assert (out / "reference.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.learned
def test_safe_clip_redirects_unsafe_text_and_keeps_safe_text(data, base_model, tmp_path):
    out = train(data, base_model, tmp_path / "run", "--epochs", "8", "--lr", "5e-3", "--lora-dropout", "0")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert set(safeclip.LAMBDAS) <= set(steps[0])  # every term is logged at every step
    first, last = sum(r["loss"] for r in steps[:4]) / 4, sum(r["loss"] for r in steps[-4:]) / 4
    assert last < first
    rows = safeclip.read_pairs(data, split="train")
    base, _ = safeclip.load(base_model)
    trained, _ = safeclip.load(out)
    t0 = safeclip.encode_texts(base, [r["safe"] for r in rows])
    before = F.cosine_similarity(safeclip.encode_texts(base, [r["unsafe"] for r in rows]), t0).mean()
    after = F.cosine_similarity(safeclip.encode_texts(trained, [r["unsafe"] for r in rows]), t0).mean()
    kept = F.cosine_similarity(safeclip.encode_texts(trained, [r["safe"] for r in rows]), t0).mean()
    # Measured with ATEN_CPU_CAPABILITY=default, avx2, avx512 and 1 or 2 threads: the loss fell to
    # 0.32 of its start, the unsafe captions rose by 0.368 (+-0.001) and the safe ones kept 0.890
    # to 0.891, every time. With the redirect terms off (text_unsafe, image_unsafe and their
    # InfoNCE at 0) the unsafe captions rose by 0.008: this fails.
    assert after > before + 0.15, (before, after)
    assert kept > 0.85, kept  # safe captions keep their place (the unsafe ones moved by > 0.15)


def test_safer_clip_caches_nearest_safe_targets_and_trains_easy_pairs_first(data, base_model, tmp_path, monkeypatch):
    drawn = []  # the training rows of each step, in order
    real = safeclip.Quadruplets.__getitem__
    monkeypatch.setattr(safeclip.Quadruplets, "__getitem__", lambda self, i: drawn.append(i) or real(self, i))
    out = train(data, base_model, tmp_path / "run", "--objective", "safer-clip", "--epochs", "3", "--eval-every", "100")
    cache = safeclip.load_safetensors(str(out / "reference.safetensors"))
    rows = safeclip.read_pairs(data)
    train_rows = [r for r in rows if r["split"] == "train"]
    all_rows = train_rows + [r for r in rows if r["split"] == "val"]
    base, preprocess = safeclip.load(base_model)
    t0u = safeclip.encode_texts(base, [r["unsafe"] for r in all_rows])
    v0u = safeclip.encode_images(base, preprocess, [r["unsafe_image"] for r in all_rows])
    assert rel_err(cache["t_unsafe_ref"], t0u) < 1e-6 and rel_err(cache["v_unsafe_ref"], v0u) < 1e-6
    t0 = F.normalize(safeclip.encode_texts(base, [r["safe"] for r in all_rows]), dim=-1).double().numpy()
    t0u = F.normalize(t0u, dim=-1).double().numpy()
    n = len(train_rows)
    # nearest safe caption of the training split, for training and validation rows alike
    assert cache["near"].tolist() == [int((t0[:n] @ q).argmax()) for q in t0u]
    # easy to hard: epoch 1 draws 12 of 36 rows (1 step of 8), the 12 with the closest captions
    pair_cos = (t0[:n] * t0u[:n]).sum(1)
    easiest = set(sorted(range(n), key=lambda i: -pair_cos[i])[:12])
    assert cache["order"].tolist() == sorted(range(n), key=lambda i: -pair_cos[i])
    assert len(drawn) == 8 * (1 + 3 + 4) and set(drawn[:8]) <= easiest
    assert len(set(drawn[8:32])) == 24 and len(set(drawn[32:])) == 32


# -- resume, failures ----------------------------------------------------------------------------------


def test_nce_scale_model_is_the_original_models_own_and_sets_every_infonce_term(data, base_model, tmp_path):
    own = safeclip.load(base_model)[0].logit_scale.exp().item()
    assert abs(own - 100) > 1  # a small CLIP's own scale differs from the paper's
    records = {}
    for scale in ("model", str(own), "100"):
        out = train(data, base_model, tmp_path / scale, "--steps", "1", "--nce-scale", scale)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        records[scale] = (log[0]["nce_scale"], first_step(out))
    assert records["model"][0] == pytest.approx(own) and records["100"][0] == 100
    nce = [k for k in safeclip.LAMBDAS if k.startswith("nce_")]
    assert all(records["model"][1][k] == pytest.approx(records[str(own)][1][k], rel=1e-6) for k in nce)
    assert all(abs(records["model"][1][k] - records["100"][1][k]) > 1e-3 for k in nce)
    assert records["model"][1]["text_safe"] == pytest.approx(records["100"][1]["text_safe"], rel=1e-6)


def test_the_dataset_decodes_each_image_once_with_a_cache(data, monkeypatch):
    rows = safeclip.read_pairs(data, split="train")
    preprocess = safeclip.image_transform(32)
    opened = collections.Counter()
    monkeypatch.setattr(safeclip, "open_image", lambda path, _open=safeclip.open_image: opened.update([path]) or _open(path))
    cached, plain = safeclip.Quadruplets(rows, preprocess, cache=True), safeclip.Quadruplets(rows, preprocess)
    order = torch.randperm(len(rows)).tolist()
    for _ in range(3):
        for i in order:
            a, b = cached[i], plain[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] == i
    paths = [r[k] for r in rows for k in ("safe_image", "unsafe_image")]
    assert all(opened[p] == 1 + 3 for p in paths)  # once for the cache, three times without one
    assert safeclip.image_cache_mib(rows, 32) == len(paths) * 3 * 32 * 32 * 4 / 2 ** 20


def test_the_image_cache_changes_no_weight_and_is_skipped_when_the_images_do_not_fit(data, base_model, tmp_path,
                                                                                   monkeypatch):
    train_paths = {r[k] for r in safeclip.read_pairs(data, split="train") for k in ("safe_image", "unsafe_image")}
    opened = collections.Counter()
    monkeypatch.setattr(safeclip, "open_image", lambda path, _open=safeclip.open_image: opened.update([path]) or _open(path))
    opens, weights = {}, {}
    for name, budget in (("cached", 2048), ("too-small", 0.5), ("off", 0)):  # the 72 images take 0.84 MiB
        opened.clear()
        out = train(data, base_model, tmp_path / name, "--epochs", "3", "--image-cache", budget)
        opens[name] = sum(n for p, n in opened.items() if p in train_paths)
        weights[name] = trainable_state(out)
    assert opens["too-small"] == opens["off"] > opens["cached"] + len(train_paths)
    for name in ("cached", "too-small"):
        assert weights[name].keys() == weights["off"].keys()
        assert all(torch.equal(weights[name][k], weights["off"][k]) for k in weights["off"])


@pytest.mark.parametrize("objective", list(safeclip.OBJECTIVES))
def test_stopping_and_resuming_gives_the_same_weights_as_one_run(data, base_model, tmp_path, objective):
    # 8 steps cross epochs (and, for safer-clip, curriculum stages of 1, 3 and 4 steps); 5 stops mid-epoch.
    o = ("--objective", objective)
    straight = train(data, base_model, tmp_path / "straight", *o, "--steps", "8", "--eval-every", "3")
    half = train(data, base_model, tmp_path / "halves", *o, "--steps", "5", "--eval-every", "3")
    train(data, base_model, half, *o, "--steps", "8", "--eval-every", "3", "--resume")
    a, b = trainable_state(straight), trainable_state(half)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(x) for x in (half / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 9))  # the log is continuous, no step twice
    terms = set(safeclip.OBJECTIVES[objective].lambdas)  # each term by name, in training and validation
    assert all(terms <= set(r) for r in log if "loss" in r) and all(terms <= set(r["val"]) for r in log if "val" in r)


def test_a_hard_kill_between_steps_resumes_to_the_same_weights(data, base_model, tmp_path):
    args = ["--steps", "7", "--save-every", "3", "--schedule", "cosine", "--warmup", "2"]
    straight = train(data, base_model, tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "safeclip.py"), "train", "--data", str(data), "--model", str(base_model),
           "--out", str(killed), "--batch-size", "8", "--workers", "0", "--seed", "1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Killed from outside on seeing step 5's log record, as a crash would.
    assert run_killed_after_step(cmd, killed / "log.jsonl", step=5, env=env) == -9
    # 36 training rows / batch 8 = 4 steps an epoch: checkpoints at steps 3, 4, 6 and 7. The kill
    # lands within milliseconds of step 5's record, long before step 6 is done: step 5 is lost.
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["step"] == 4
    assert subprocess.run(cmd + ["--resume"], capture_output=True, env=env).returncode == 0
    a, b = trainable_state(straight), trainable_state(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s1 = safeclip.load_safetensors(str(straight / "model.safetensors"))
    s2 = safeclip.load_safetensors(str(killed / "model.safetensors"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, base_model, tmp_path, monkeypatch, capsys):
    """Bugs guarded: a NaN that trains on or overwrites the last good checkpoint; a message without
    the eight term values (M4), which say which term blew up."""
    real = safeclip.OBJECTIVES["safeclip"].loss
    calls = []

    def poisoned(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        if total.requires_grad:  # a training step, not a validation
            calls.append(1)
        return (total * float("nan"), terms) if len(calls) == 5 else (total, terms)

    monkeypatch.setitem(safeclip.OBJECTIVES, "safeclip", dataclasses.replace(safeclip.OBJECTIVES["safeclip"], loss=poisoned))
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--model", str(base_model), "--out", str(out), "--batch-size", "8",
            "--workers", "0", "--steps", "10", "--save-every", "2"]
    assert safeclip.main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err
    for name in safeclip.LAMBDAS:
        assert re.search(rf"\b{name}=-?\d", err), name
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["trainable"].values())
    assert not (out / "model.safetensors").exists()  # no final model from a failed run


# -- export ------------------------------------------------------------------------------------------


def test_export_to_hugging_face_gives_the_same_embeddings(data, base_model, tmp_path):
    from transformers import CLIPModel
    out = train(data, base_model, tmp_path / "run", "--steps", "3", "--lr", "1e-2")
    assert safeclip.main(["export", str(out), "--hf", str(tmp_path / "hf")]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = safeclip.load(out)
    ids = ours.tokenizer(["a red circle on grey splashed with blood", "a bar"], context_length=16)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=ids)
        image = hf.get_image_features(pixel_values=pixels)
        text = text if torch.is_tensor(text) else text.pooler_output
        image = image if torch.is_tensor(image) else image.pooler_output
        assert rel_err(ours.encode_text(ids), text) < 1e-5
        assert rel_err(ours.encode_image(pixels), image) < 1e-5
    again, _ = safeclip.load(tmp_path / "hf")  # and our loader reads the export back
    assert again.tokenizer is not None and torch.equal(again.tokenizer(["a bar"], context_length=16),
                                                        ours.tokenizer(["a bar"], context_length=16))


def test_export_to_openai_naming_loads_in_openais_build_model(data, base_model, tmp_path, openai_model):
    """Bug guarded: an export OpenAI's code misreads. build_model rounds the weights it converts to
    fp16 (not LayerNorm or the embeddings); ours gets the same rounding, so the two agree to 1e-5."""
    assert safeclip.main(["export", str(base_model), "--openai", str(tmp_path / "w.pt")]) == 0
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    ref = openai_model.build_model(dict(sd))
    halved = {k for k, v in ref.state_dict().items() if v.dtype == torch.float16}
    assert halved and len(halved) < len(sd)
    ref = ref.float()
    ours, _ = safeclip.load(base_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name in halved:
                p.copy_(p.half().float())
        ids = ours.tokenizer(["a blue square on grey", "a red bar splashed with blood"], context_length=16)
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        assert rel_err(ours.encode_text(ids), ref.encode_text(ids)) < 1e-5
        assert rel_err(ours.encode_image(pixels), ref.encode_image(pixels)) < 1e-5


def test_export_without_a_target_is_an_error(base_model):
    with pytest.raises(SystemExit, match="--hf OUT"):
        safeclip.main(["export", str(base_model)])


def test_full_fine_tuning_with_a_frozen_tower_leaves_that_tower_untouched(data, base_model, tmp_path):
    out = train(data, base_model, tmp_path / "run", "--full", "--freeze", "vision", "--steps", "3", "--lr", "1e-3")
    before = safeclip.load_safetensors(str(base_model / "model.safetensors"))
    after = safeclip.load_safetensors(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith("visual.") for k in changed)
    assert "logit_scale" not in changed  # the Safe-CLIP objective has a fixed scale
    assert {k for k in changed if k.startswith("transformer.")}  # the text tower did train


def test_gradient_checkpointing_gives_the_same_gradients(base_model):
    grads = []
    for checkpointing in (False, True):
        model, _ = safeclip.load(base_model)
        model.transformer.grad_checkpointing = model.visual.transformer.grad_checkpointing = checkpointing
        ids = model.tokenizer(["a red circle on grey", "a blue bar on grey splashed with blood"], context_length=16)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        (model.encode_text(ids).square().sum() + model.encode_image(pixels).square().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters())) - 1  # all but logit_scale
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


# -- refusals: before any work, one line naming the flag or file, nothing written into --out --------


def refused(argv, capsys, *fragments):
    """Run the command line; it must fail, name every fragment in one line, and leave --out absent."""
    try:
        rc = safeclip.main(argv)
    except SystemExit as e:  # argparse and cmd_train's up-front checks
        rc = e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    err = capsys.readouterr().err.strip().splitlines()
    assert rc not in (0, None) and err, err
    for fragment in fragments:
        assert fragment in err[-1], err
    assert not Path(argv[argv.index("--out") + 1]).exists()


@pytest.mark.parametrize("steps", [[], ["--steps", "2"]])
def test_skip_bad_that_leaves_less_than_one_batch_is_refused(tmp_path, base_model, capsys, steps):
    """Bug: the row count was checked before --skip-bad dropped unreadable images, so 3 good rows
    at batch 4 gave `done: 0 steps` and an untrained model (or ZeroDivisionError with --steps)."""
    path = make_pairs(tmp_path, n=6)
    for i in (1, 2, 4):
        (tmp_path / "images" / f"{i}_safe.png").write_bytes(b"not a png")
    argv = ["train", "--data", str(path), "--model", str(base_model), "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--workers", "0", "--skip-bad", *steps]
    refused(argv, capsys, "pairs.jsonl", "3 training rows (after skipping 3 bad row(s))", "one batch of 4")


SCRATCH = "width=64,layers=1,embed_dim=16,image_resolution=32,vision_patch_size=8,context_length=16"


@pytest.mark.parametrize("extra,fragments", [
    (["--scratch", SCRATCH], ["--scratch needs --objective clip"]),
    (["--scratch", "image_resolution=30,vision_patch_size=8", "--objective", "clip"],
     ["--scratch", "image_resolution=30 is not a multiple of vision_patch_size=8"]),
    (["--scratch", "width=200", "--objective", "clip"], ["--scratch", "width=200 does not split"]),
    (["--scratch", "layers=two", "--objective", "clip"], ["--scratch", "layers='two'"]),
    (["--model", "MODEL", "--freeze", "text", "vision"], ["--freeze text vision leaves nothing to train"]),
    (["--model", "MODEL", "--nce-scale", "0"], ["--nce-scale takes a positive number or 'model'", "'0'"]),
    (["--model", "MODEL", "--nce-scale", "modle"], ["--nce-scale takes a positive number or 'model'", "'modle'"]),
    (["--scratch", SCRATCH, "--objective", "clip", "--nce-scale", "50"], ["--nce-scale applies to a fine-tuning"]),
])
def test_meaningless_options_are_refused_before_any_work(data, base_model, tmp_path, capsys, extra, fragments):
    """Bugs: --scratch with the Safe-CLIP objective died in _fingerprint(None) after training a
    tokenizer; a resolution that is no multiple of the patch trained every step, then failed to
    save; --freeze text vision died in the optimizer after computing the references."""
    extra = [str(base_model) if x == "MODEL" else x for x in extra]
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "8", "--workers", "0",
            "--steps", "1", *extra]
    refused(argv, capsys, *fragments)


# -- validation ------------------------------------------------------------------------------------


def test_validation_loss_weights_every_row_including_the_last_partial_batch(data, base_model):
    """Bug: the loss averaged full batches only, so with 7 val rows at batch 4 rows 4-6 were ignored
    by best-model selection and early stopping."""
    model, preprocess = safeclip.load(base_model)
    rows = safeclip.read_pairs(data, split="val")[:7]
    ids = [model.tokenizer([r[k] for r in rows], context_length=16) for k in ("safe", "unsafe")]
    g = torch.Generator().manual_seed(torch.seed() % 2**32)
    refs = {"t_ref": torch.randn(7, 32, generator=g), "v_ref": torch.randn(7, 32, generator=g)}
    args = safeclip.build_parser().parse_args(["train", "--data", "-", "--out", "-", "--batch-size", "4"])
    loss_fn = safeclip.OBJECTIVES["safeclip"].loss
    loss = safeclip.validate(model, rows, ids, preprocess, refs, loss_fn, args, "cpu")["loss"]
    t, t_star = safeclip.encode_token_ids(model, ids[0]), safeclip.encode_token_ids(model, ids[1])
    v = safeclip.encode_images(model, preprocess, [r["safe_image"] for r in rows])
    v_star = safeclip.encode_images(model, preprocess, [r["unsafe_image"] for r in rows])
    by_hand = sum(len(range(7)[s]) / 7 * safeclip.safe_clip_loss(t[s], t_star[s], v[s], v_star[s], refs["t_ref"][s],
                                                                 refs["v_ref"][s])[0]
                  for s in (slice(0, 4), slice(4, 7)))
    assert loss == pytest.approx(float(by_hand), rel=1e-6)
    refs["t_ref"][4:] = torch.randn(3, 32, generator=g)  # the remainder's targets change: so must the loss
    assert abs(safeclip.validate(model, rows, ids, preprocess, refs, loss_fn, args, "cpu")["loss"] - loss) > 1e-3


# -- references: the cache key ---------------------------------------------------------------------


def test_reference_cache_key_covers_tokenizer_content_and_code(data, base_model, tmp_path, monkeypatch):
    """Bug: the key held the tokenizer's vocabulary size, not its content, so another --tokenizer
    of the same size reused stale references; nor did it cover the code that computes them."""
    model, _ = safeclip.load(base_model)
    rows = safeclip.read_pairs(data)
    key = safeclip._fingerprint(base_model, rows, model)
    assert safeclip._fingerprint(base_model, rows, model) == key
    tok = model.tokenizer
    merges = list(tok._merges)
    merges[-2:] = merges[-1], merges[-2]  # the same vocabulary, another BPE
    model.tokenizer = safeclip.Tokenizer(tok._vocab, merges)
    assert model.tokenizer.vocab_size == tok.vocab_size
    assert safeclip._fingerprint(base_model, rows, model) != key
    model.tokenizer = tok
    changed = tmp_path / "safeclip.py"
    changed.write_text(Path(safeclip.__file__).read_text() + "\n# a change\n")
    monkeypatch.setattr(safeclip, "__file__", str(changed))
    assert safeclip._fingerprint(base_model, rows, model) != key


def test_train_takes_the_activation_of_a_plain_state_dict_from_the_command_line(data, base_model, tmp_path):
    """Bug: `train --model weights.pt` had no way to override the activation guessed from the width."""
    assert safeclip.main(["export", str(base_model), "--openai", str(tmp_path / "w.pt")]) == 0
    (tmp_path / "w.json").unlink()  # a plain state dict from elsewhere records no activation
    out = train(data, tmp_path / "w.pt", tmp_path / "run", "--tokenizer", str(base_model), "--steps", "1",
                "--no-quick-gelu")
    assert safeclip.load(out)[0].config.quick_gelu is False


# -- gradient accumulation and the references' precision -----------------------------------------


def test_accum_gives_the_loss_terms_and_gradients_of_one_batch_n_times_larger(data, base_model, tmp_path):
    """Bug: each micro-batch computed its own InfoNCE, so --accum 2 drew the negatives from half the
    batch: another objective, with other gradients (updates of opposite sign were measured)."""
    common = ("--steps", "1", "--lora-dropout", "0", "--grad-clip", "0", "--eval-every", "99")
    big = train(data, base_model, tmp_path / "big", "--batch-size", "8", *common)
    accum = train(data, base_model, tmp_path / "accum", "--batch-size", "2", "--accum", "4", *common)
    logs = [first_step(out) for out in (big, accum)]
    for name in ["loss", *safeclip.LAMBDAS]:
        assert logs[1][name] == pytest.approx(logs[0][name], rel=1e-5, abs=1e-6), name
    # After one AdamW step, exp_avg is (1 - beta1) x the gradient: the gradients, read back exactly.
    grads = [torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"] for out in (big, accum)]
    assert grads[0].keys() == grads[1].keys()
    scale = max(g["exp_avg"].abs().max() for g in grads[0].values())
    assert scale > 0
    for i in grads[0]:
        assert torch.allclose(grads[1][i]["exp_avg"], grads[0][i]["exp_avg"], rtol=1e-5, atol=1e-5 * scale), i


def test_references_are_float32_whatever_the_precision(data, base_model, tmp_path):
    """Bug: the references were computed under bf16 autocast on CUDA even in an fp32 run, so every
    target carried bf16 rounding. A bf16 run must read the same float32 references as an fp32 one."""
    out = train(data, base_model, tmp_path / "run", "--steps", "1", "--precision", "bf16", "--eval-every", "99")
    cache = safeclip.load_safetensors(str(out / "reference.safetensors"))
    rows = [r for r in safeclip.read_pairs(data) if r["split"] == "train"]
    base, preprocess = safeclip.load(base_model)
    with torch.autocast("cpu", enabled=False):
        t0 = safeclip.encode_token_ids(base, base.tokenizer([r["safe"] for r in rows], context_length=16), precision="fp32")
        v0 = safeclip.encode_images(base, preprocess, [r["safe_image"] for r in rows], precision="fp32")
    assert cache["t_ref"].dtype == torch.float32
    assert rel_err(cache["t_ref"][:len(rows)], t0) < 1e-6 and rel_err(cache["v_ref"][:len(rows)], v0) < 1e-6


# -- what the loop promises: references used, best model kept, clipping, checkpointing, defaults --


def first_batch_rows(data, seed=1, batch=8):
    """The training rows of step 1: the loop's seeded permutation of the rows, cut into batches."""
    rows = safeclip.read_pairs(data, split="train")
    return [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:batch]]


def test_the_loop_trains_against_the_cached_references(data, base_model, tmp_path):
    """Bug guarded (M3, the public code's bug): targets taken from the model being trained (its own
    detached safe embeddings) instead of the frozen references. Poisoned references, with their
    fingerprint kept, must drive the logged loss and the update."""
    args = ("--steps", "1", "--lora-dropout", "0", "--eval-every", "99")
    clean = train(data, base_model, tmp_path / "clean", *args)
    cache = tmp_path / "poisoned" / "reference.safetensors"
    cache.parent.mkdir()
    from safetensors import safe_open
    with safe_open(str(clean / "reference.safetensors"), "pt") as f:
        metadata, shape = f.metadata(), f.get_tensor("t_ref").shape
    g = torch.Generator().manual_seed(torch.seed() % 2**32)
    poison = {"t_ref": torch.randn(shape, generator=g), "v_ref": torch.randn(shape, generator=g)}
    safeclip.save_safetensors(poison, str(cache), metadata=metadata)
    poisoned = train(data, base_model, tmp_path / "poisoned", *args)
    assert safeclip.load_safetensors(str(cache))["t_ref"].equal(poison["t_ref"])  # reused, not recomputed

    rows = first_batch_rows(data)
    train_rows = safeclip.read_pairs(data, split="train")
    index = [train_rows.index(r) for r in rows]
    base, preprocess = safeclip.load(base_model)
    emb = [safeclip.encode_texts(base, [r[k] for r in rows]) for k in ("safe", "unsafe")]
    emb += [safeclip.encode_images(base, preprocess, [r[k] for r in rows]) for k in ("safe_image", "unsafe_image")]
    expected, terms = safeclip.safe_clip_loss(*emb, poison["t_ref"][index], poison["v_ref"][index])
    logged = first_step(poisoned)
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-5)
    for name, value in terms.items():
        assert logged[name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    a, b = trainable_state(clean), trainable_state(poisoned)
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # the update followed the targets


REAL_VALIDATE = safeclip.validate


def scripted_validation(monkeypatch, losses, recalls=None):
    """Validation as the loop runs it, with the loss (and recall-sum) replaced by a script: the
    only way to make a tiny run's validation loss rise exactly when a test wants."""
    real, calls = REAL_VALIDATE, []

    def validate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["loss"] = losses[len(calls)]
        if recalls:
            metrics["recall_sum"] = recalls[len(calls)]
        calls.append(metrics)
        return metrics

    monkeypatch.setattr(safeclip, "validate", validate)
    return calls


def final_weights(out):
    return safeclip.load_safetensors(str(Path(out) / "model.safetensors"))


def test_the_best_model_is_kept_and_training_stops_after_patience(data, base_model, tmp_path, monkeypatch):
    """Bugs guarded (M1): the final model being the last one instead of the best validated one;
    early stopping that never stops (or stops too soon); --select recall ignored."""
    args = ("--eval-every", "1", "--lr", "1e-2")
    scripted_validation(monkeypatch, [5, 4, 3])
    at_3 = final_weights(train(data, base_model, tmp_path / "three", "--steps", "3", *args))

    calls = scripted_validation(monkeypatch, [5, 4, 3, 6, 7, 8, 9, 9])
    out = train(data, base_model, tmp_path / "loss", "--steps", "8", "--patience", "2", *args)
    assert len(calls) == 5  # best at validation 3, then 2 without improvement: stop
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert all(r["best_step"] == 3 for r in log if "val" in r and r["step"] >= 3)
    final = final_weights(out)
    assert all(torch.equal(final[k], at_3[k]) for k in final)

    scripted_validation(monkeypatch, [5, 4, 6, 1, 0.5], recalls=[10, 20, 30, 25, 5])
    out = train(data, base_model, tmp_path / "recall", "--steps", "5", "--patience", "0", "--select", "recall", *args)
    final = final_weights(out)
    assert all(torch.equal(final[k], at_3[k]) for k in final)  # recall peaked at step 3, the loss at 5


def test_clipping_scales_a_large_gradient_and_leaves_a_small_one(data, base_model, tmp_path):
    """Bug guarded (M2): gradient clipping removed or ignoring --grad-clip. The gradient the optimizer
    saw is read back from AdamW's state after one step (exp_avg = 0.1 x gradient)."""
    def gradient(clip):
        out = train(data, base_model, tmp_path / f"clip{clip}", "--steps", "1", "--lora-dropout", "0",
                    "--eval-every", "99", "--grad-clip", clip)
        state = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
        return torch.cat([s["exp_avg"].flatten() / 0.1 for _, s in sorted(state.items())])

    raw = gradient(0)
    norm = raw.norm().item()
    assert torch.allclose(gradient(norm / 2), raw / 2, rtol=1e-4, atol=1e-6 * norm)
    assert torch.allclose(gradient(norm * 2), raw, rtol=1e-5, atol=1e-7 * norm)


def test_grad_checkpointing_recomputes_the_blocks_in_the_backward_pass(data, base_model, tmp_path):
    """Bug guarded (M2): --grad-checkpointing as a no-op. Each block's forward must run once more in
    the backward pass (the gradients staying the same is tested above)."""
    calls = []

    def count(module, _):
        if isinstance(module, safeclip.ResidualAttentionBlock):
            calls.append(torch.is_grad_enabled())

    counts = []
    for i, flag in enumerate(([], ["--grad-checkpointing"])):
        handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
        try:
            train(data, base_model, tmp_path / f"run{i}", "--steps", "2", "--eval-every", "99", *flag)
        finally:
            handle.remove()
        counts.append(len(calls))
        calls.clear()
    blocks, steps = 2 + 2, 2  # text and vision blocks
    assert counts[1] - counts[0] == blocks * steps  # one recomputation per block and step


def test_the_paper_defaults_are_pinned(data, base_model, tmp_path):
    """Bug guarded (M4): a default drifting from the public recipe (LoRA dropout 0.1 -> 0, patience
    5 -> 0, ...) with every other test passing, since they set their options explicitly."""
    out = tmp_path / "run"
    assert safeclip.main(["train", "--data", str(data), "--model", str(base_model), "--out", str(out),
                          "--workers", "0", "--steps", "1"]) == 0
    config = json.loads((out / "train_config.json").read_text())
    paper = dict(lora_rank=16, lora_alpha=1.0, lora_dropout=0.1, lr=1e-3, batch_size=16, grad_clip=1.0, patience=5,
                 accum=1, weight_decay=0.0, objective="safeclip", select="loss", full=False, lambdas=None)
    assert {k: config[k] for k in paper} == paper
    assert safeclip.LAMBDAS == {"text_safe": 0.10, "text_unsafe": 0.10, "image_safe": 0.10, "image_unsafe": 0.20,
                                "nce_text_safe": 0.25, "nce_text_unsafe": 0.25, "nce_image_safe": 0.25,
                                "nce_image_unsafe": 0.50}
    assert all(v.shape[0] == 16 for k, v in trainable_state(out).items() if k.endswith(".A"))  # rank 16 in use


def test_accum_recomputes_exactly_the_embeddings_it_cached(data, base_model, tmp_path, monkeypatch):
    """Bug guarded: the recomputation of a micro-batch drawing new dropout masks, so the gradient
    would not be that of the loss computed (and logged) on the cached embeddings."""
    real, totals = safeclip.OBJECTIVES["safeclip"].loss, []
    counting = lambda *a, **k: totals.append(real(*a, **k)[0].item()) or real(*a, **k)
    monkeypatch.setitem(safeclip.OBJECTIVES, "safeclip", dataclasses.replace(safeclip.OBJECTIVES["safeclip"], loss=counting))
    train(data, base_model, tmp_path / "run", "--batch-size", "4", "--accum", "2", "--steps", "2", "--eval-every", "99")
    # Per step: the whole batch's loss, then once per recomputed micro-batch. Step 1 alone would
    # not do: LoRA's B starts at zero, so its dropout changes nothing until the first update.
    for step in range(2):
        cached, *recomputed = totals[3 * step:3 * step + 3]
        assert recomputed == [cached, cached], step
