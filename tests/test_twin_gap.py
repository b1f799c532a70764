"""twin-gap (ours, issue #34): Safe-CLIP's eight terms plus hinges that set each unsafe item aside
from its safe twin along the modality gap g, and a term that holds every safe item's component along
g; against a float64 NumPy oracle on random embeddings: g itself, each term, rows without V*, the
weighting, which embeddings each term moves, and that the frozen targets carry g into a run."""

import functools
import json

import numpy as np
import pytest
import torch

import safeclip
from test_train import base_model, data  # noqa: F401  (fixtures)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_gap_direction(t0, v0):
    d = unit(t0).mean(0) - unit(v0).mean(0)
    return d / np.linalg.norm(d)


def np_hinge(shortfall, tau):
    return float(np.mean(tau * np.logaddexp(0.0, shortfall / tau)))  # tau * softplus(x / tau)


def np_twin_gap_terms(t, tu, v, vu, t0, v0, has, g, a, tau):
    """The three terms twin-gap adds, from their definitions in docs/objectives.md."""
    on = lambda x: unit(x) @ g
    terms = {"gap_text": np_hinge(on(t) + a - on(tu), tau)}  # T(T*) at least a beyond T(T) along g
    if has.any():
        terms["gap_image"] = np_hinge(on(vu) + a - on(v[has]), tau)  # V(V*) at least a short of V(V)
    terms["gap_hold"] = float(np.mean((on(t) - on(t0)) ** 2) + np.mean((on(v) - on(v0)) ** 2))
    return terms


def embeddings(seed, batch=10, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(6)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gap_direction_matches_the_oracle_and_points_from_images_to_captions(seed):
    t0, v0 = embeddings(seed, batch=50)[:2]
    v0 = v0 - 3.0  # a gap, as CLIP has one: images on one side, captions on the other
    g = safeclip.modality_gap(t0.float(), v0.float())
    assert np.allclose(g.numpy(), np_gap_direction(t0.numpy(), v0.numpy()), atol=1e-6)
    on = lambda x: (torch.nn.functional.normalize(x.float(), dim=-1) @ g)
    assert on(t0).mean() > on(v0).mean()  # captions lie further along g than images


@pytest.mark.parametrize("seed,a,tau,scale", [(0, 0.1, 0.02, 100.0), (1, 0.3, 0.05, 20.0), (2, 0.0, 0.1, 5.0)])
def test_every_term_matches_the_oracle(seed, a, tau, scale):
    t, tu, v, vu, t0, v0 = embeddings(seed)
    g = np_gap_direction(t0.numpy(), v0.numpy())
    x = [e.float() for e in (t, tu, v, vu, t0, v0)]
    total, terms = safeclip.twin_gap_loss(*x, gap_dir=torch.tensor(g, dtype=torch.float32), offset=a, tau=tau,
                                          scale=scale)
    _, eight = safeclip.safe_clip_loss(*x, scale=scale)
    assert list(terms) == list(eight) + ["gap_text", "gap_image", "gap_hold"]
    assert all(torch.equal(terms[k], eight[k]) for k in eight)  # the eight are Safe-CLIP's
    every = np.ones(len(t), dtype=bool)
    expected = np_twin_gap_terms(*(e.numpy() for e in (t, tu, v, vu, t0, v0)), every, g, a, tau)
    for name, value in expected.items():
        assert abs(terms[name].item() - value) <= 1e-5 * max(1.0, value), name
    weights = safeclip.TWIN_GAP_LAMBDAS
    ref_total = sum(weights[k] * terms[k].item() for k in terms) / sum(weights[k] for k in terms)
    assert abs(total.item() - ref_total) <= 1e-5 * abs(ref_total)


def test_its_defaults_are_the_measured_setting():
    # docs/objectives.md: a = 0.1, tau = 0.02, the preserve terms 1, gap_image 4, gap_hold 4, the rest Safe-CLIP's.
    assert (safeclip.TWIN_GAP, safeclip.TWIN_GAP_TAU) == (0.1, 0.02)
    assert safeclip.TWIN_GAP_LAMBDAS == {**safeclip.LAMBDAS, "text_safe": 1.0, "image_safe": 1.0, "nce_text_safe": 1.0,
                                         "nce_image_safe": 1.0, "gap_text": 1.0, "gap_image": 4.0, "gap_hold": 4.0}


def test_rows_without_an_unsafe_image_give_only_the_terms_that_exist():
    t, tu, v, vu, t0, v0 = embeddings(3)
    g = np_gap_direction(t0.numpy(), v0.numpy())
    gap_dir = torch.tensor(g, dtype=torch.float32)
    has = torch.tensor([True, False, True, True, False, False, True, False, True, False])
    x = [e.float() for e in (t, tu, v)] + [vu[has].float()] + [e.float() for e in (t0, v0)]
    _, terms = safeclip.twin_gap_loss(*x, has_unsafe_image=has, gap_dir=gap_dir)
    expected = np_twin_gap_terms(t.numpy(), tu.numpy(), v.numpy(), vu[has].numpy(), t0.numpy(), v0.numpy(),
                                 has.numpy(), g, safeclip.TWIN_GAP, safeclip.TWIN_GAP_TAU)
    for name, value in expected.items():  # gap_image over the rows with V*, each against its own V
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    none = torch.zeros(10, dtype=torch.bool)
    total, terms = safeclip.twin_gap_loss(*x[:3], vu[none].float(), *x[4:], has_unsafe_image=none, gap_dir=gap_dir)
    assert set(terms) == {"text_safe", "text_unsafe", "image_safe", "nce_text_safe", "nce_text_unsafe",
                          "nce_image_safe", "gap_text", "gap_hold"}
    assert torch.isfinite(total)


@pytest.mark.parametrize("term,moves", [("gap_text", "tu"), ("gap_image", "vu"), ("gap_hold", "t v")])
def test_a_step_on_each_term_moves_only_its_items_and_lowers_it(term, moves):
    t, tu, v, vu, t0, v0 = embeddings(4)
    g = torch.tensor(np_gap_direction(t0.numpy(), v0.numpy()), dtype=torch.float32)
    x = dict(zip(("t", "tu", "v", "vu"), (e.float().requires_grad_(True) for e in (t, tu, v, vu))))
    loss = lambda: safeclip.twin_gap_loss(x["t"], x["tu"], x["v"], x["vu"], t0.float(), v0.float(), gap_dir=g,
                                          offset=0.3, tau=0.05)[1][term]
    value = loss()
    value.backward()
    # The hinges move the unsafe item only (its safe twin is a constant there); the hold, only safe items.
    assert {k for k, e in x.items() if e.grad is not None and e.grad.abs().sum() > 0} == set(moves.split())
    with torch.no_grad():
        for k in moves.split():
            x[k] -= 0.5 * x[k].grad
    assert loss().item() < value.item()


def test_options_twin_gap_takes_and_refuses(monkeypatch):
    seen = []
    monkeypatch.setattr(safeclip, "train", seen.append)
    assert safeclip.main(["train", "--data", "d.jsonl", "--objective", "twin-gap", "--offset", "0.2"]) == 0
    assert (seen[0].objective, seen[0].offset) == ("twin-gap", 0.2)
    with pytest.raises(SystemExit, match="--margin and --margin-tau only apply to --objective twin-margin and twin-nce"):
        safeclip.main(["train", "--data", "d.jsonl", "--objective", "twin-gap", "--margin", "0.2"])
    with pytest.raises(SystemExit, match="unknown term"):
        safeclip.main(["train", "--data", "d.jsonl", "--objective", "twin-gap", "--lambdas", "rank_text_safe=1"])
    with pytest.raises(SystemExit, match="--offset only applies to --objective twin-offset and twin-gap"):
        safeclip.main(["train", "--data", "d.jsonl", "--objective", "twin-margin", "--offset", "0.2"])
    with pytest.raises(SystemExit, match="--offset takes a number >= 0"):
        safeclip.main(["train", "--data", "d.jsonl", "--objective", "twin-gap", "--offset", "-0.1"])


def test_a_run_takes_g_from_the_original_model_s_training_rows(data, base_model):  # noqa: F811
    """`frozen_targets` computes g once, from T0(T) and V0(V) of the training split, and
    `bind_objective` binds it (with --offset) to the loss."""
    model, preprocess = safeclip.load(str(base_model))
    rows = safeclip.read_pairs(data)
    n_train = len(rows) - 3
    targets = safeclip.frozen_targets("twin-gap", model, preprocess, rows, n_train, "cpu", 8)
    assert set(targets) == {"t_ref", "v_ref", "gap_dir"}
    expected = np_gap_direction(targets["t_ref"][:n_train].double().numpy(), targets["v_ref"][:n_train].double().numpy())
    assert np.allclose(targets["gap_dir"].numpy(), expected, atol=1e-6)
    config = safeclip.TrainConfig(data=str(data), objective="twin-gap", offset=0.25)
    loss_fn, refs, order = safeclip.bind_objective(config, targets, n_train, model.logit_scale)
    assert loss_fn.func is safeclip.twin_gap_loss and order is None
    assert loss_fn.keywords["offset"] == 0.25 and torch.equal(loss_fn.keywords["gap_dir"], targets["gap_dir"])
    assert [len(v) for v in refs["train"].values()] == [n_train, n_train]
    # The constants go to the model's device once, with the loss, not at every step ("meta" stands in for CUDA).
    on_device = safeclip.bind_objective(config, targets, n_train, torch.nn.Parameter(torch.zeros((), device="meta")))[0]
    assert on_device.keywords["gap_dir"].device.type == "meta"


def rows_without_some_unsafe_images(data, folder):
    """`data`'s rows, image paths made absolute, with V* left out of every third row."""
    lines = []
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        for key in ("safe_image", "unsafe_image"):
            row[key] = str(data.parent / row[key])
        if i % 3 == 0:
            row["unsafe_image"] = None
        lines.append(json.dumps(row))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_a_run_on_rows_without_an_unsafe_image_trains_and_validates(data, base_model, tmp_path):  # noqa: F811
    """Rows without V* (the public datasets have none) train on the terms that exist, and the cache
    key of g reads only the files g comes from."""
    partial = rows_without_some_unsafe_images(data, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--data", str(partial), "--model", str(base_model), "--out", str(out), "--batch-size", "8",
            "--workers", "0", "--seed", "1", "--objective", "twin-gap", "--steps", "4", "--eval-every", "2"]
    assert safeclip.main(argv) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps, vals = [r for r in log if "loss" in r], [r["val"] for r in log if "val" in r]
    assert len(steps) == 4 and all({"gap_text", "gap_hold"} <= set(r) for r in steps)
    assert vals and all({"gap_text", "gap_image", "gap_hold"} <= set(v) for v in vals)
    assert all(np.isfinite(r["loss"]) for r in steps)


def test_validation_averages_gap_image_over_the_rows_that_have_v_star(data, base_model):  # noqa: F811
    """`validate` runs the loss batch by batch; a term over the rows with V* is weighted by each
    batch's share of those rows, so the result is the term over all of them at once."""
    model, preprocess = safeclip.load(base_model)
    rows = safeclip.read_pairs(data, split="val")[:9]
    for i in (0, 3, 4, 8):  # batches of 4: 3, 2 and 0 rows with V*
        rows[i] = {**rows[i], "unsafe_image": None}
    ids = [model.tokenizer([r[k] for r in rows], context_length=16) for k in ("safe", "unsafe")]
    g = torch.Generator().manual_seed(torch.seed() % 2**32)
    refs = {"t_ref": torch.randn(9, 32, generator=g), "v_ref": torch.randn(9, 32, generator=g)}
    gap_dir = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    args = safeclip.build_parser().parse_args(["train", "--data", "-", "--out", "-", "--batch-size", "4"])
    loss_fn = functools.partial(safeclip.twin_gap_loss, gap_dir=gap_dir)
    val = safeclip.validate(model, rows, ids, preprocess, refs, loss_fn, args, "cpu")
    has = torch.tensor([r["unsafe_image"] is not None for r in rows])
    t, t_star = safeclip.encode_token_ids(model, ids[0]), safeclip.encode_token_ids(model, ids[1])
    v = safeclip.encode_images(model, preprocess, [r["safe_image"] for r in rows])
    v_star = safeclip.encode_images(model, preprocess, [r["unsafe_image"] for r in rows if r["unsafe_image"]])
    _, at_once = loss_fn(t, t_star, v, v_star, refs["t_ref"], refs["v_ref"], has_unsafe_image=has)
    assert val["gap_image"] == pytest.approx(at_once["gap_image"].item(), rel=1e-5)
    assert val["gap_hold"] == pytest.approx(at_once["gap_hold"].item(), rel=1e-5)
