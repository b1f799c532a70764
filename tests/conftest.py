"""Shared fixtures: OpenAI's reference code (from the clip-anytorch package), loaded by file path
because the package's __init__ imports torchvision; and small random inputs."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clip_package_dir():
    spec = importlib.util.find_spec("clip")
    if spec is None:  # an oracle the tests need, not an optional extra: fail, don't skip
        raise RuntimeError("clip-anytorch is not installed: pip install --no-deps clip-anytorch==2.6.0")
    return Path(spec.submodule_search_locations[0])


def load_reference(name):
    """A module of clip-anytorch (model.py or simple_tokenizer.py), imported by its file path."""
    path = clip_package_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def openai_model():
    return load_reference("model")


@pytest.fixture(scope="session")
def openai_vocab():
    return clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz"


def random_token_ids(n, context_length=77, vocab_size=49408, generator=None, max_len=None):
    """Realistic token rows: SOT, a caption-length run of ids, EOT (the highest id), zero padding.
    Lengths vary from row to row, up to a full context."""
    g = generator or torch.Generator().manual_seed(0)
    max_len = max_len or context_length - 2
    ids = torch.zeros(n, context_length, dtype=torch.long)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    lengths[0] = max_len  # one row always uses the whole context
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0] = vocab_size - 2
        ids[i, 1:length + 1] = torch.randint(1, vocab_size - 2, (length,), generator=g)
        ids[i, length + 1] = vocab_size - 1
    return ids


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
           "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("square", "circle", "bar")


def draw(colour, shape, unsafe, size=40):
    """A coloured shape on grey; the unsafe twin carries a dark red 'blood' splash in a corner."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(image)
    box = (8, 8, size - 8, size - 8)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.rectangle((size // 2 - 4, 4, size // 2 + 4, size - 4), fill=fill)
    if unsafe:
        d.ellipse((0, 0, size // 2, size // 3), fill=(110, 0, 0))
    return image


def make_pairs(folder, n=48, splits=("train",), seed=0, aliases=False):
    """A pairs.jsonl with `n` quadruplets of drawn images and truthful captions."""
    import json
    import random
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        for kind in ("safe", "unsafe"):
            draw(colour, shape, kind == "unsafe").save(folder / "images" / f"{i}_{kind}.png")
        row = {"safe": f"a {colour} {shape} on grey", "unsafe": f"a {colour} {shape} on grey splashed with blood",
               "safe_image": f"images/{i}_safe.png", "unsafe_image": f"images/{i}_unsafe.png",
               "category": "blood", "split": splits[i % len(splits)]}
        if aliases:
            row["nsfw"], row["nsfw_image"] = row.pop("unsafe"), row.pop("unsafe_image")
        lines.append(json.dumps(row))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def tiny_openai_vocab_clip(context_length=32, seed=0):
    """A small random CLIP with OpenAI's vocabulary and tokenizer (so ids are OpenAI's), every
    weight drawn at random, layer norms included, so that no wrong mapping can hide behind ones
    and zeros."""
    import safeclip
    torch.manual_seed(seed)
    config = safeclip.CLIPConfig(embed_dim=24, image_resolution=32, vision_layers=3, vision_width=64,
                                 vision_patch_size=8, vision_heads=2, context_length=context_length,
                                 text_width=32, text_heads=2, text_layers=2)
    model = safeclip.CLIP(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.tokenizer = safeclip.Tokenizer.from_file(clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz")
    return model.eval()


def tiny_stable_diffusion(text_encoder, tokenizer):
    """A Stable Diffusion pipeline built from configs, as diffusers' own fast tests build theirs: a
    two-block UNet whose cross-attention width is the text encoder's, a two-block VAE (32 x 32
    images, 16 x 16 latents), DDIM, no safety checker. Random weights; nothing is downloaded."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_killed_after_step(cmd, log, step, timeout=600, **popen):
    """Run `cmd` and kill it hard (SIGKILL, no clean-up of any kind) as soon as its `log` (a
    log.jsonl) holds the record of training step `step`, as a crash would. Returns the process's
    return code (-9 when it was killed, anything else when it ended first)."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(r.get("step", 0) >= step and "loss" in r for r in _whole_records(log)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
        proc.stderr.close()
    return proc.returncode


def _whole_records(log):
    """The JSON records of a log.jsonl that is being written: a line not yet complete is skipped."""
    import json
    records = []
    for line in (Path(log).read_text().splitlines() if Path(log).exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records
