"""How many rows fit on a GPU: the activation memory of a Safe-CLIP training step, per image and per
caption, for OpenAI's ViT-B/32, B/16 and L/14 under bf16 autocast, and the largest --batch-size per
GPU memory that follows, with and without --grad-checkpointing.

    python benchmarks/activation_memory.py                      # the three models (~3 min on 2 CPU cores)
    python benchmarks/activation_memory.py --out docs/training.md   # refresh the table there
    python benchmarks/activation_memory.py --models tiny --json -   # the test suite's size, as JSON

Measured on the CPU, where autograd keeps the same tensors as on a GPU: a forward pass of random
weights with LoRA attached (the default recipe: rank 16, dropout 0.1, both towers), in training
mode, counting the bytes of every distinct storage that autograd saves for backward
(saved-tensor hooks; the model's own parameters excluded). One item and two items are measured;
their difference is the cost of an item, the rest is per step (autocast's low-precision copies
of the frozen weights). Captions are counted at the full 77 tokens: a batch is trimmed to its
longest caption, and among 256 captions one is nearly always long.

The plan for a GPU adds, per process: the frozen weights in float32, the adapters with their
gradients and AdamW's two moments, and a reserve of RESERVE_GIB for the CUDA context, cuBLAS and
attention workspaces and the allocator's slack; and it fills at most USABLE of the card. A row is
a quadruplet with V*: two captions and two images. With --grad-checkpointing a block keeps only
its input, and the backward pass holds one block's activations at a time. These are estimates
from counts, not a GPU measurement: benchmarks/gpu_check.sh measures the real peak on a GPU.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import safeclip  # noqa: E402
from bench import SavedActivations  # noqa: E402

MODELS = {
    "B/32": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32, vision_heads=12,
                 text_width=512, text_heads=8, text_layers=12),
    "B/16": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, vision_heads=12,
                 text_width=512, text_heads=8, text_layers=12),
    "L/14": dict(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14, vision_heads=16,
                 text_width=768, text_heads=12, text_layers=12),
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 vision_heads=2, text_width=64, text_heads=2, text_layers=2, vocab_size=1000, context_length=16),
}
GPUS_GIB = (24, 40, 80, 141)
RESERVE_GIB = 3.0
USABLE = 0.9
GIB = 1 << 30


def saved_bytes(model, run, grad_checkpointing=False):
    """Bytes autograd keeps after `run(model)` (a forward pass), under bf16 autocast."""
    for tower in (model.transformer, model.visual.transformer):
        tower.grad_checkpointing = grad_checkpointing
    with SavedActivations(model.parameters()) as saved, safeclip.autocast("cpu", "bf16"):
        out = run(model)
    del out
    return saved.bytes


def measure(name):
    """Per image, per caption and per step bytes of one model: a dict."""
    config = safeclip.CLIPConfig(**MODELS[name])
    torch.manual_seed(0)
    model = safeclip.CLIP(config)
    adapters = safeclip.add_lora(model)  # the default recipe: rank 16, alpha 1, dropout 0.1, both towers
    model.train()
    r, ctx = config.image_resolution, config.context_length
    ids = lambda n: torch.cat([torch.full((n, ctx - 1), 1000 % config.vocab_size), torch.full((n, 1), config.vocab_size - 1)], 1)
    image = lambda n, ckpt=False: saved_bytes(model, lambda m: m.encode_image(torch.randn(n, 3, r, r)), ckpt)
    text = lambda n, ckpt=False: saved_bytes(model, lambda m: m.encode_text(ids(n)), ckpt)
    i1, i2, t1, t2 = image(1), image(2), text(1), text(2)
    out = dict(model=name, image=i2 - i1, caption=t2 - t1, per_step=(i1 - (i2 - i1)) + (t1 - (t2 - t1)),
               weights=sum(p.numel() for p in model.parameters() if not p.requires_grad) * 4,
               adapters=sum(p.numel() for p in adapters) * 4 * 4)  # weight, gradient, two AdamW moments
    # --grad-checkpointing: what the hooks see outside the blocks, each block's input (the vision
    # residual stream is bf16 under autocast, the text one float32), one block's activations.
    grid = (r // config.vision_patch_size) ** 2 + 1
    for what, n_items, layers, tokens, width, residual in (
            ("image", image, config.vision_layers, grid, config.vision_width, 2),
            ("caption", text, config.text_layers, ctx, config.text_width, 4)):
        outside = n_items(2, True) - n_items(1, True)
        block = (out[what] - outside) / layers
        out[f"{what}_checkpointed"] = round(outside + layers * tokens * width * residual + block)
    return out


def largest_batch(m, gib, checkpointed):
    """Rows (two captions, two images) per process that fit in `gib` GiB of GPU memory."""
    suffix = "_checkpointed" if checkpointed else ""
    row = 2 * m["image" + suffix] + 2 * m["caption" + suffix]
    room = USABLE * gib * GIB - RESERVE_GIB * GIB - m["weights"] - m["adapters"] - m["per_step"]
    return max(0, math.floor(room / row))


def table(results):
    mib = lambda b: f"{b / (1 << 20):,.1f}"
    lines = ["| model | per image, MiB | per caption (77 tokens), MiB | per row (T, T*, V, V*), MiB | "
             + " | ".join(f"{g} GB" for g in GPUS_GIB) + " |",
             "|---|---|---|---|" + "---|" * len(GPUS_GIB)]
    for m in results:
        for ckpt in (False, True):
            s = "_checkpointed" if ckpt else ""
            row = 2 * m["image" + s] + 2 * m["caption" + s]
            lines.append(f"| {m['model']}{' --grad-checkpointing' if ckpt else ''} | {mib(m['image' + s])} | "
                         f"{mib(m['caption' + s])} | {mib(row)} | "
                         + " | ".join(str(largest_batch(m, g, ckpt)) for g in GPUS_GIB) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B/32", "B/16", "L/14"], choices=list(MODELS))
    parser.add_argument("--out", help="a Markdown file whose activation-memory:begin/end markers get the table")
    parser.add_argument("--json", help="write the measurements as JSON to this file ('-': standard output)")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    results = [measure(name) for name in args.models]
    text = table(results)
    print(text)
    if args.json:
        data = json.dumps(results, indent=2)
        print(data) if args.json == "-" else Path(args.json).write_text(data + "\n")
    if args.out:
        path = Path(args.out)
        doc = path.read_text()
        begin, end = "<!-- activation-memory:begin -->", "<!-- activation-memory:end -->"
        if begin not in doc or end not in doc:
            raise SystemExit(f"error: {path} has no {begin} ... {end} markers")
        head, rest = doc.split(begin, 1)
        path.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
