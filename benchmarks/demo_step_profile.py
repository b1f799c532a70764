"""Where a step of demo.sh's training goes on the CPU: the toy CLIP's pre-training step and a Safe-CLIP
step (LoRA rank 16, alpha 4, dropout 0.1, both towers), at the demo's size, with the operators that
take the most time (torch.profiler), and the Safe-CLIP step once more without LoRA's dropout.

    python benchmarks/demo_step_profile.py            # ~1 minute on 2 CPU cores

Random weights and inputs of the demo's shapes (64 quadruplets with V*, 48-pixel images, captions of
16 tokens after trimming), the optimizer step included; no data loading, logging or validation.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402

# demo.sh's ARCH: width=96,layers=4,embed_dim=128,image_resolution=48,vision_patch_size=8,context_length=40
TOY = safeclip.CLIPConfig(embed_dim=128, image_resolution=48, vision_layers=4, vision_width=96, vision_patch_size=8,
                          vision_heads=1, context_length=40, vocab_size=1000, text_width=96, text_heads=1, text_layers=4)


def make_step(kind, batch, dropout=0.1):
    """A closure that runs one training step of `kind` ("clip" or "safeclip") on fixed random inputs."""
    torch.manual_seed(0)
    model = safeclip.CLIP(TOY)
    model.initialize()
    pixels = torch.randn(2 * batch, 3, TOY.image_resolution, TOY.image_resolution)
    ids = torch.randint(1, TOY.vocab_size - 2, (2 * batch, 16))
    ids[:, -1] = TOY.vocab_size - 1  # EOT: the highest id
    if kind == "clip":
        params = list(model.parameters())
    else:
        with torch.no_grad():
            t_ref, v_ref = model.encode_text(ids[:batch]), model.encode_image(pixels[:batch])
        params = safeclip.add_lora(model, 16, 4.0, dropout)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        text, image = model.encode_text(ids), model.encode_image(pixels)
        if kind == "clip":
            loss = safeclip.clip_loss(text, image, model.logit_scale)
        else:
            loss = safeclip.safe_clip_loss(*text.chunk(2), *image.chunk(2), t_ref, v_ref, scale=21.0)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def seconds_per_step(step, steps):
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def top_operators(step, steps, rows):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    return [(e.key, e.self_cpu_time_total / total) for e in averages[:rows]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps timed per setting")
    parser.add_argument("--batch", type=int, default=64, help="quadruplets per step (demo.sh: 64)")
    parser.add_argument("--top", type=int, default=6, help="operators listed per setting")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.batch} quadruplets per step")
    for name, kind, dropout in (("toy CLIP pre-training", "clip", 0.1), ("Safe-CLIP, LoRA dropout 0.1", "safeclip", 0.1),
                                ("Safe-CLIP, LoRA dropout 0", "safeclip", 0.0)):
        step = make_step(kind, args.batch, dropout)
        seconds = seconds_per_step(step, args.steps)
        ops = top_operators(step, max(2, args.steps // 4), args.top)
        print(f"\n{name}: {seconds * 1000:.0f} ms a step")
        for key, share in ops:
            print(f"  {share * 100:5.1f}%  {key}")


if __name__ == "__main__":
    main()
