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
