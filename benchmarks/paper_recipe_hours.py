"""How long the paper's recipe takes on one GPU, from the FLOP count: ViT-L/14 with LoRA (rank 16)
on both towers, ViSU's ~160k training quadruplets with V*, 20 epochs, at a given model FLOP
utilisation (MFU) of the GPU's dense bf16 peak. The FLOPs per quadruplet are bench.py's formulas
(checked against torch's FLOP counter in tests/test_bench.py); --accum 2 adds one forward pass
without a graph per micro-batch.

    python benchmarks/paper_recipe_hours.py                 # one H200 at 40% MFU
    python benchmarks/paper_recipe_hours.py --gpu H100 --mfu 0.3
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="H200", choices=sorted(bench.PEAK_BF16_TFLOPS))
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--rows", type=int, default=160_000, help="training quadruplets (ViSU: ~160k)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=48, help="caption length a trimmed batch runs at")
    args = parser.parse_args()
    s, r = bench.MODELS["L/14"], bench.RECIPE["rank"]
    train = 2 * bench.text_flops(s, args.tokens, r, True, pooled=True) + 2 * bench.image_flops(s, r, True, pooled=True)
    forward = 2 * bench.text_flops(s, args.tokens, r, pooled=True) + 2 * bench.image_flops(s, r, pooled=True)
    reference = (bench.text_flops(s, args.tokens, pooled=True) + bench.image_flops(s, pooled=True)) / args.epochs
    rate = args.mfu * bench.PEAK_BF16_TFLOPS[args.gpu] * 1e12
    print(f"| {args.gpu} at {args.mfu:.0%} MFU, ViT-L/14, {args.rows:,} rows x {args.epochs} epochs | "
          "GFLOP per quadruplet | quadruplets/s | hours |\n|---|---|---|---|")
    for name, flops in (("one batch (fits: --batch-size 128 on 141 GB)", train + reference),
                        ("--accum 2 (80 GB: --batch-size 64 --accum 2)", train + forward + reference)):
        hours = flops * args.rows * args.epochs / rate / 3600
        print(f"| {name} | {flops / 1e9:,.0f} | {rate / flops:,.0f} | {hours:.1f} |")


if __name__ == "__main__":
    main()
