"""The Hugging Face export as its real clients use it: Stable Diffusion (diffusers) takes its text
tower and tokenizer, LLaVA-style code its vision tower, CLIPProcessor its preprocessing. Tiny
random models built here; nothing is downloaded."""

import numpy as np
import pytest
import torch
from conftest import rel_err, tiny_openai_vocab_clip, tiny_stable_diffusion
from PIL import Image

import safeclip

torch.set_num_threads(1)
CONTEXT = 32  # not 77: the tokenizer's model_max_length must come from the model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, the folder `python safeclip.py export CKPT --hf OUT` wrote)."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_openai_vocab_clip(CONTEXT)
    safeclip.save(model, root / "ckpt")
    assert safeclip.main(["export", str(root / "ckpt"), "--hf", str(root / "hf")]) == 0
    return model, root / "hf"


def test_export_writes_openais_folder_layout(exported):
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_stable_diffusion_runs_on_our_text_encoder_and_tokenizer(exported):
    from transformers import CLIPTextModel, CLIPTokenizer
    model, out = exported
    pipe = tiny_stable_diffusion(CLIPTextModel.from_pretrained(out), CLIPTokenizer.from_pretrained(out))
    prompt = "a photo of an astronaut riding a horse on the moon"
    image = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    # The ids the pipeline feeds its text encoder are ours, padded with EOT to the model's context.
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    ours = model.tokenizer([prompt], context_length=CONTEXT)
    eot = int(ours[0].argmax())
    assert ids.shape == (1, CONTEXT) and torch.equal(ids[0, :eot + 1], ours[0, :eot + 1])
    assert (ids[0, eot:] == model.tokenizer.eot_id).all()
    # Its prompt embeddings are CLIPTextModel's last hidden state for those ids, and at EOT they
    # give our encode_text once through the final projection.
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
        hidden = pipe.text_encoder(ids).last_hidden_state
        assert embeds.shape == (1, CONTEXT, 32) and torch.equal(embeds, hidden)
        assert rel_err(embeds[:, eot] @ model.text_projection, model.encode_text(ours)) < 1e-5


def test_llava_reads_the_vision_tower_and_its_penultimate_layer(exported):
    from transformers import CLIPVisionModel
    model, out = exported
    tower = CLIPVisionModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(states) == model.config.vision_layers + 1
        # LLaVA's features: the hidden states before the last block, all tokens; ours, computed by hand.
        v = model.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        assert rel_err(states[-2], x) < 1e-5


def test_projection_models_give_our_embeddings(exported):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    model, out = exported
    ids = model.tokenizer(["a red circle", "two dogs play in the snow; one barks"], context_length=CONTEXT)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = CLIPTextModelWithProjection.from_pretrained(out).eval()(input_ids=ids).text_embeds
        image = CLIPVisionModelWithProjection.from_pretrained(out).eval()(pixel_values=pixels).image_embeds
        assert (text - model.encode_text(ids)).abs().max() < 1e-5
        assert (image - model.encode_image(pixels)).abs().max() < 1e-5


def test_clip_processor_loads_with_the_models_resolution(exported):
    from transformers import CLIPProcessor
    model, out = exported
    processor = CLIPProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))
    batch = processor(text=["a cat"], images=image, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    row = model.tokenizer(["a cat"], context_length=CONTEXT)[0]
    assert batch["input_ids"][0].tolist() == row[row != 0].tolist()
    # The same preprocessing as ours up to CLIPImageProcessor's known pixel of difference.
    ours = safeclip.image_transform(32)(image)
    assert (batch["pixel_values"][0] - ours).abs().mean() < 0.1
