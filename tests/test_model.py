"""The model and its loaders: our CLIP gives OpenAI's and Hugging Face's numbers on the same weights,
reads every kind of file a user has, and refuses anything that is not exactly a ViT CLIP."""

import json
import os
import pickle
import zipfile

import pytest
import torch
from conftest import random_token_ids, rel_err

import safeclip

# (embed, resolution, vision layers, vision width, patch, context, vocab, text width, text heads, text layers)
CONFIGS = {
    "tiny": (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2),
    "odd": (48, 48, 3, 128, 16, 40, 1000, 128, 2, 1),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
}
TOL = 1e-5


def reference_clip(openai_model, name, seed=0):
    torch.manual_seed(seed)
    return openai_model.CLIP(*CONFIGS[name]).eval()


def inputs(name, n=4, seed=1):
    embed, res, *_ = CONFIGS[name]
    ctx, vocab = CONFIGS[name][5], CONFIGS[name][6]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, res, res, generator=g), random_token_ids(n, ctx, vocab, generator=g, max_len=min(ctx - 2, 30))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_openai_reference_on_its_state_dict(openai_model, name, tmp_path):
    ref = reference_clip(openai_model, name)
    torch.save(ref.state_dict(), tmp_path / "weights.pt")
    ours, preprocess = safeclip.load(tmp_path / "weights.pt")
    images, ids = inputs(name)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), ref.encode_image(images)) <= TOL
        assert rel_err(ours.encode_text(ids), ref.encode_text(ids)) <= TOL
        ours_logits, ref_logits = ours(images, ids), ref(images, ids)
    assert isinstance(ours_logits, tuple) and len(ours_logits) == 2
    for a, b in zip(ours_logits, ref_logits):
        assert a.shape == b.shape and rel_err(a, b) <= TOL
    assert not ours.training and ours.logit_scale.dtype == torch.float32
    assert preprocess(__import__("PIL.Image").Image.new("RGB", (50, 70))).shape == (3, CONFIGS[name][1], CONFIGS[name][1])


def hf_clip(name, act="quick_gelu", seed=0):
    from transformers import CLIPConfig, CLIPModel
    embed, res, vl, vw, patch, ctx, vocab, tw, th, tl = CONFIGS[name]
    config = CLIPConfig(
        text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_attention_heads=th, num_hidden_layers=tl,
                         max_position_embeddings=ctx, vocab_size=vocab, hidden_act=act, eos_token_id=vocab - 1,
                         bos_token_id=vocab - 2),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_attention_heads=vw // 64, num_hidden_layers=vl,
                           image_size=res, patch_size=patch, hidden_act=act),
        projection_dim=embed)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # HF initialises some tensors to constants; make every one of them count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def features(output):
    return output if torch.is_tensor(output) else output.pooler_output


@pytest.mark.parametrize("name,act", [("tiny", "quick_gelu"), ("odd", "gelu"), ("ViT-B/32", "quick_gelu")])
def test_matches_transformers_on_a_saved_hf_folder(name, act, tmp_path):
    hf = hf_clip(name, act)
    hf.save_pretrained(tmp_path)
    ours, _ = safeclip.load(tmp_path)
    assert ours.config.quick_gelu == (act == "quick_gelu")
    images, ids = inputs(name)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), features(hf.get_image_features(pixel_values=images))) <= TOL
        assert rel_err(ours.encode_text(ids), features(hf.get_text_features(input_ids=ids))) <= TOL
        out = hf(input_ids=ids, pixel_values=images)
        assert rel_err(ours(images, ids)[0], out.logits_per_image) <= TOL


def test_reads_older_hf_folders_with_pytorch_model_bin_and_position_ids(tmp_path):
    hf = hf_clip("tiny")
    hf.config.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours, _ = safeclip.load(tmp_path)
    images, ids = inputs("tiny")
    with torch.no_grad():
        assert rel_err(ours.encode_text(ids), features(hf.get_text_features(input_ids=ids))) <= TOL


def torchscript_fixture(openai_model, path):
    """What OpenAI released: a traced model whose state dict also holds three non-weights."""
    ref = reference_clip(openai_model, "tiny", seed=3)
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(ref, key):
            delattr(ref, key)
        ref.register_buffer(key, torch.tensor(value))
    images, ids = inputs("tiny")
    traced = torch.jit.trace_module(ref, {"forward": (images, ids), "encode_image": (images,), "encode_text": (ids,)})
    torch.jit.save(traced, path)
    return ref


def test_loads_openai_torchscript_archive_without_running_torchscript(openai_model, tmp_path, monkeypatch):
    ref = torchscript_fixture(openai_model, tmp_path / "ViT-tiny.pt")

    def forbidden(*args, **kwargs):
        raise AssertionError("TorchScript must not be executed")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)  # the archive is read by our tensor-only unpickler
    ours, _ = safeclip.load(tmp_path / "ViT-tiny.pt")
    images, ids = inputs("tiny")
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), ref.encode_image(images)) <= TOL
        assert rel_err(ours.encode_text(ids), ref.encode_text(ids)) <= TOL


def test_half_precision_files_load_as_float32(openai_model, tmp_path):
    ref = reference_clip(openai_model, "tiny")
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in ref.state_dict().items()}}, tmp_path / "w.pth")
    ours, _ = safeclip.load(tmp_path / "w.pth")
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    images, ids = inputs("tiny")
    with torch.no_grad():
        assert rel_err(ours.encode_text(ids), ref.half().float().encode_text(ids)) <= TOL


class Payload:
    """Unpickling this would create a file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": torch.zeros(2, 2), "evil": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(safeclip.CheckpointError, match="evil.pt"):
        safeclip.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_torchscript_archive_with_a_malicious_pickle_is_refused(openai_model, tmp_path):
    torchscript_fixture(openai_model, tmp_path / "good.pt")
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "good.pt") as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(str(marker)), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(safeclip.CheckpointError, match="evil.pt"):
        safeclip.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_legacy_non_zip_pickles_are_not_read(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "old.pt").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(safeclip.CheckpointError, match="old.pt"):
        safeclip.load(tmp_path / "old.pt")
    assert not marker.exists()


@pytest.fixture
def tiny_state_dict(openai_model):
    return reference_clip(openai_model, "tiny").state_dict()


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("ln_final.bias"), "missing key 'ln_final.bias'"),
    (lambda sd: sd.__setitem__("visual.extra", torch.zeros(1)), "unexpected key 'visual.extra'"),
    (lambda sd: sd.__setitem__("transformer.resblocks.1.mlp.c_fc.bias", torch.zeros(7)),
     "'transformer.resblocks.1.mlp.c_fc.bias' has shape \\(7,\\)"),
])
def test_loading_is_strict_and_names_the_offending_key(tiny_state_dict, tmp_path, change, message):
    change(tiny_state_dict)
    torch.save(tiny_state_dict, tmp_path / "bad.pt")
    with pytest.raises(safeclip.CheckpointError, match=message) as e:
        safeclip.load(tmp_path / "bad.pt")
    assert "bad.pt" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_files_give_one_clear_error(tiny_state_dict, tmp_path, damage):
    torch.save(tiny_state_dict, tmp_path / "w.pt")
    save_dir = tmp_path / "ours"
    model = safeclip.CLIP(safeclip.infer_config(tiny_state_dict))
    safeclip.save(model, save_dir)
    for path in (tmp_path / "w.pt", save_dir / "model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:64] + os.urandom(len(data) - 64))
    for target in (tmp_path / "w.pt", save_dir):
        with pytest.raises(safeclip.CheckpointError) as e:
            safeclip.load(target)
        assert str(target) in str(e.value)


def test_resnet_checkpoints_get_a_clear_error(openai_model, tmp_path):
    torch.manual_seed(0)
    resnet = openai_model.CLIP(64, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1)
    torch.save(resnet.state_dict(), tmp_path / "RN.pt")
    with pytest.raises(safeclip.CheckpointError, match="only ViT models are supported"):
        safeclip.load(tmp_path / "RN.pt")


@pytest.mark.parametrize("name,args,heads,quick", [
    ("ViT-B/32", (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12), 12, True),
    ("ViT-B/16", (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12), 12, True),
    ("ViT-L/14", (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12), 16, True),
    ("ViT-L/14@336px", (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12), 16, True),
    ("OpenCLIP ViT-H/14", (1024, 224, 32, 1280, 14, 77, 49408, 1024, 16, 24), 16, False),
])
def test_every_size_is_inferred_from_the_state_dict(openai_model, name, args, heads, quick):
    with torch.device("meta"):  # shapes only: no memory, no time
        sd = openai_model.CLIP(*args).state_dict()
    config = safeclip.infer_config(sd)
    embed, res, vl, vw, patch, ctx, vocab, tw, th, tl = args
    assert config == safeclip.CLIPConfig(embed, res, vl, vw, patch, heads, ctx, vocab, tw, th, tl, quick)
    with torch.device("meta"):
        assert safeclip.CLIP(config).state_dict().keys() == sd.keys()


def test_exact_gelu_is_used_when_asked(openai_model, tmp_path):
    """OpenCLIP's LAION models use exact GELU; our model must then match a GELU reference."""
    ref = reference_clip(openai_model, "tiny")
    for module in ref.modules():
        if hasattr(module, "mlp"):
            module.mlp.gelu = torch.nn.GELU()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    ours, _ = safeclip.load(tmp_path / "w.pt", quick_gelu=False)
    images, ids = inputs("tiny")
    with torch.no_grad():
        assert rel_err(ours.encode_text(ids), ref.encode_text(ids)) <= TOL
        default, _ = safeclip.load(tmp_path / "w.pt")
        assert rel_err(default.encode_text(ids), ref.encode_text(ids)) > TOL  # the switch matters


def test_trimming_text_to_the_longest_caption_changes_nothing():
    torch.manual_seed(0)
    model = safeclip.CLIP(safeclip.CLIPConfig(32, 32, 1, 64, 8, 1, 77, 49408, 64, 1, 2)).eval()
    ids = random_token_ids(6, max_len=12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trimmed = model.encode_text(ids)
        # Without trimming: run the full 77 positions by hand.
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.transformer(x, causal=True)
        full = model.ln_final(x[torch.arange(6), ids.argmax(-1)]) @ model.text_projection
    assert int(ids.argmax(-1).max()) + 1 <= 14  # the batch really was trimmed from 77
    assert rel_err(trimmed, full) <= 1e-6


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = safeclip.CLIP(safeclip.CLIPConfig(32, 32, 1, 64, 8, 1, 20, 300, 64, 1, 1, quick_gelu=False)).eval()
    safeclip.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["safeclip"]["config"]["quick_gelu"] is False
    loaded, _ = safeclip.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_files_and_foreign_folders_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        safeclip.load(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(safeclip.CheckpointError, match="config.json"):
        safeclip.load(tmp_path / "empty")


def test_openai_vocabulary_next_to_the_weights_is_attached(openai_model, openai_vocab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(safeclip, "HERE", tmp_path / "repo")  # a vocabulary in the repo's weights/ would count
    torch.save(reference_clip(openai_model, "tiny").state_dict(), tmp_path / "w.pt")
    alone, _ = safeclip.load(tmp_path / "w.pt")
    assert alone.tokenizer is None
    with pytest.raises(RuntimeError, match="safeclip.py download"):
        safeclip.require_tokenizer(alone)
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(openai_vocab.read_bytes())
    found, _ = safeclip.load(tmp_path / "w.pt")
    assert found.tokenizer(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def scratch_model(spec, **changes):
    import dataclasses
    config = safeclip.scratch_config(safeclip.parse_scratch(spec), 300)
    torch.manual_seed(0)
    return safeclip.CLIP(dataclasses.replace(config, **changes)).eval()


def test_export_openai_keeps_the_activation_and_head_counts(tmp_path):
    """Bugs: `export --openai` of an exact-GELU model came back as QuickGELU (guessed from the width),
    and a scratch model narrower than 64 came back with 0 heads (ZeroDivisionError at its first
    forward); neither is visible in the tensors, so the export records them beside the file."""
    spec = "width=32,layers=2,embed_dim=16,image_resolution=16,vision_patch_size=8,context_length=20"
    for model in (scratch_model(spec, quick_gelu=False), scratch_model(spec.replace("32", "128"), vision_heads=4)):
        safeclip.export_openai(model, tmp_path / "w.pt")
        loaded, _ = safeclip.load(tmp_path / "w.pt")
        assert loaded.config == model.config
        images, ids = torch.randn(3, 3, 16, 16), random_token_ids(3, 20, 300, max_len=10)
        with torch.no_grad():
            assert rel_err(loaded.encode_text(ids), model.encode_text(ids)) <= 1e-6
            assert rel_err(loaded.encode_image(images), model.encode_image(images)) <= 1e-6
    (tmp_path / "w.json").unlink()  # the tensors alone: the head count is guessed (never 0)
    assert safeclip.load(tmp_path / "w.pt")[0].config.vision_heads == 2
    safeclip.export_openai(scratch_model(spec), tmp_path / "w.pt")
    (tmp_path / "w.json").unlink()
    assert safeclip.load(tmp_path / "w.pt")[0].config.vision_heads == 1


@pytest.mark.parametrize("flag,quick", [([], True), (["--no-quick-gelu"], False), (["--quick-gelu"], True)])
def test_export_command_takes_the_activation_for_a_plain_state_dict(tmp_path, flag, quick):
    """Bug: no command had a way to override the activation guessed for a plain state dict, so
    OpenCLIP's LAION weights given as .pt trained, evaluated and exported with QuickGELU."""
    tok = safeclip.Tokenizer.train(["a cat", "a dog"], vocab_size=600)
    tok.save(tmp_path)
    torch.save(scratch_model("width=64,layers=1,embed_dim=16,image_resolution=16,vision_patch_size=8",
                             vocab_size=tok.vocab_size).state_dict(), tmp_path / "w.pt")
    assert safeclip.main(["export", str(tmp_path / "w.pt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                          "--hf", str(tmp_path / "hf"), *flag]) == 0
    act = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["hidden_act"]
    assert act == ("quick_gelu" if quick else "gelu")


def test_a_short_context_model_reads_the_tokenizers_default_ids_and_refuses_a_caption_too_long():
    """Bug: `model.encode_text(model.tokenizer(texts))`, the README's usage, failed on a model with a
    context shorter than the tokenizer's default 77 (the demo's models: 40), for the padding alone."""
    model = scratch_model("width=32,layers=2,embed_dim=16,image_resolution=16,vision_patch_size=8,context_length=20")
    short = random_token_ids(3, 77, 300, max_len=10)  # EOT within the first 10 positions, zeros after
    with torch.no_grad():
        assert torch.equal(model.encode_text(short), model.encode_text(short[:, :20]))
    long = random_token_ids(3, 77, 300, max_len=30)  # row 0's caption fills 30 positions: past 20
    with pytest.raises(ValueError, match="reads at most 20: tokenize with context_length=20"):
        model.encode_text(long)
