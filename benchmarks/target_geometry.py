"""What each objective's targets would score if a model met them exactly.

An objective pulls every unsafe item to a target made of frozen embeddings: Safe-CLIP puts T(T*) on
T0(T) and V(V*) on V0(V); twin-offset puts them a step a along a direction u off those spots. This
script skips training: it takes the original model's embeddings of the test split, puts each unsafe
item exactly on its target (the safe items stay where the original model put them), and scores that
geometry with evaluate.py's own metrics. A figure missed here is missed by any model that meets
those targets; a figure met here tells that the targets leave room for it, and training must get there.

    python benchmarks/target_geometry.py runs/demo            # the demo's toy CLIP and test split
    python benchmarks/target_geometry.py runs/demo --offsets 0.05 0.1 0.2 0.3 0.5 1

Directions u (each unit length; the text target is normalize(T0(T) + a u), the image target
normalize(V0(V) - a u), as in twin-offset):
  eigen  twin-offset's: the top eigenvector of M(unsafe) - M(safe);
  gap    the modality gap: mean T0(T) minus mean V0(V) (normalised embeddings);
each over the first --train-rows rows of the training split (1000; twin-offset itself uses them all).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import safeclip  # noqa: E402

RECALLS = evaluate.RETRIEVAL[:4]  # T->V, V->T, T*->V, V*->T: R@1; then evaluate.UNSAFE's four: unsafe@1


def embeddings(ckpt, rows, batch_size=64):
    """{"T", "T*", "V", "V*"} -> (N, E) normalised embeddings of `rows` under `ckpt`."""
    encoder = evaluate.Encoder(str(ckpt), batch_size=batch_size, name=Path(ckpt).name)
    encode = lambda kind: encoder.texts if kind.startswith("T") else encoder.images
    return {kind: F.normalize(encode(kind)([r[field] for r in rows], kind).float(), dim=-1)
            for kind, field in evaluate.FIELDS.items()}


def figures(emb):
    """The eight figures of docs/objectives.md's tables (R@1 and unsafe@1, %) for one geometry."""
    m = evaluate.quadruplet_metrics(emb)
    r, u = m["retrieval"], m["unsafe_at_k"]
    return [r[k]["R@1"] for k in RECALLS] + [u[k]["@1"] for k in evaluate.UNSAFE]


def directions(train):
    safe, unsafe = torch.cat([train["T"], train["V"]]), torch.cat([train["T*"], train["V*"]])
    return {"eigen": safeclip.unsafe_direction(safe, unsafe),
            "gap": safeclip.modality_gap(train["T"], train["V"])}  # twin-gap's g


def stepped_aside(test, u, a):
    """The test split with each unsafe item on its twin-offset target along u at length a."""
    n = lambda x: F.normalize(x, dim=-1)
    return {"T": test["T"], "V": test["V"], "T*": n(test["T"] + a * u), "V*": n(test["V"] - a * u)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", help="a demo.sh output folder: DEMO/data/pairs.jsonl and DEMO/clip")
    parser.add_argument("--model", help="the original model (default: DEMO/clip)")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0], metavar="A")
    parser.add_argument("--train-rows", type=int, default=1000, help="training rows the directions are taken from")
    args = parser.parse_args(argv)
    pairs = Path(args.demo) / "data" / "pairs.jsonl"
    model = args.model or Path(args.demo) / "clip"
    test = embeddings(model, evaluate.read_split(pairs, "test"))
    train = embeddings(model, evaluate.read_split(pairs, "train")[: args.train_rows])
    rows = [("the original model", test), ("Safe-CLIP's targets (the twin's own spot)",
                                           {"T": test["T"], "V": test["V"], "T*": test["T"], "V*": test["V"]})]
    for name, u in directions(train).items():
        rows += [(f"{name} direction, a = {a:g}", stepped_aside(test, u, a)) for a in args.offsets]
    print(f"{pairs}, split test: {len(test['T'])} quadruplets; each unsafe item exactly on its target\n")
    columns = [*RECALLS, *(f"{k} unsafe@1" for k in evaluate.UNSAFE)]
    print("| targets | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, emb in rows:
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in figures(emb)) + " |")


if __name__ == "__main__":
    main()
