"""Weight interpolation between a model and the one it was fine-tuned from (WiSE-FT, Wortsman et al.,
CVPR 2022): theta = theta0 + a (theta_ft - theta0), each tower by its own a. a = 1 is the fine-tuned
model, a = 0 the original; in between, the usual way to win back zero-shot accuracy after fine-tuning.
docs/objectives.md ("Interpolating back toward the toy CLIP") scores it on the demo.

    python benchmarks/interpolate.py runs/objectives/twin-gap runs/demo/clip runs/wise --text 0.8 --vision 1

The text tower is every weight outside `visual.`; the temperature (logit_scale) stays the fine-tuned
model's. The result is written with safeclip.save, with the fine-tuned model's tokenizer, and loads
like any model (evaluate.py --compare NAME=OUT).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402


def interpolate(tuned, base, text, vision):
    """{name: tensor}: base + a (tuned - base), a = `vision` for `visual.*` weights, `text` for the rest
    (logit_scale: tuned's). Both state dicts must hold the same names and shapes."""
    if tuned.keys() != base.keys():
        raise SystemExit(f"error: the two models differ in weights: {sorted(tuned.keys() ^ base.keys())[:3]}")
    out = {}
    for name, w in tuned.items():
        if w.shape != base[name].shape:
            raise SystemExit(f"error: {name} is {tuple(w.shape)} in one model, {tuple(base[name].shape)} in the other")
        a = vision if name.startswith("visual.") else text
        out[name] = w if name == "logit_scale" else torch.lerp(base[name], w, a)  # (exact at a = 0 and a = 1)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuned", help="the fine-tuned model (anything safeclip.load reads)")
    parser.add_argument("base", help="the model it was fine-tuned from")
    parser.add_argument("out", help="folder to write the interpolated model to")
    parser.add_argument("--text", type=float, default=1.0, metavar="A", help="the text tower's a (default 1)")
    parser.add_argument("--vision", type=float, default=1.0, metavar="A", help="the vision tower's a (default 1)")
    args = parser.parse_args(argv)
    tuned, _ = safeclip.load(args.tuned)
    base, _ = safeclip.load(args.base)
    tuned.load_state_dict(interpolate(tuned.state_dict(), base.state_dict(), args.text, args.vision))
    safeclip.save(tuned, args.out, tokenizer=tuned.tokenizer)
    print(args.out)


if __name__ == "__main__":
    main()
