"""twin-margin (ours): Safe-CLIP's eight terms plus hinge terms whose only negative is the row's
own unsafe twin, against a float64 NumPy oracle on random embeddings: each term, rows without V*,
the weighting, and the gradient's direction (the unsafe twin's score falls)."""

import numpy as np
import pytest
import torch

import safeclip

RANK_TERMS = ["rank_text_safe", "rank_text_unsafe", "rank_image_safe", "rank_image_unsafe"]


def np_rank(query, safe, unsafe, margin, tau):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    q, s, u = unit(query), unit(safe), unit(unsafe)
    gap = np.sum(q * u, axis=1) - np.sum(q * s, axis=1)
    return float(np.mean(tau * np.logaddexp(0.0, (gap + margin) / tau)))  # tau * softplus(x / tau)


def embeddings(seed, batch=10, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(6)]


@pytest.mark.parametrize("seed,margin,tau", [(0, 0.1, 0.02), (1, 0.3, 0.1), (2, 0.0, 0.05)])
def test_the_ranking_terms_match_the_oracle_and_the_eight_terms_are_safe_clips(seed, margin, tau):
    t, tu, v, vu, t0, v0 = embeddings(seed)
    total, terms = safeclip.twin_margin_loss(*[e.float() for e in (t, tu, v, vu, t0, v0)], margin=margin, tau=tau)
    _, eight = safeclip.safe_clip_loss(*[e.float() for e in (t, tu, v, vu, t0, v0)])
    assert list(terms) == list(eight) + ["rank_text_safe", "rank_text_unsafe", "rank_image_unsafe", "rank_image_safe"]
    assert all(torch.equal(terms[k], eight[k]) for k in eight)
    n = lambda x: x.numpy()
    expected = {"rank_text_safe": np_rank(n(t), n(v), n(vu), margin, tau),  # caption queries: V over V*
                "rank_text_unsafe": np_rank(n(tu), n(v), n(vu), margin, tau),
                "rank_image_safe": np_rank(n(v), n(t), n(tu), margin, tau),  # image queries: T over T*
                "rank_image_unsafe": np_rank(n(vu), n(t), n(tu), margin, tau)}
    for name, value in expected.items():
        assert abs(terms[name].item() - value) <= 1e-5 * max(1.0, value), name
    weights = safeclip.TWIN_MARGIN_LAMBDAS
    ref_total = sum(weights[k] * terms[k].item() for k in terms) / sum(weights[k] for k in terms)
    assert abs(total.item() - ref_total) <= 1e-5 * abs(ref_total)


def test_rows_without_an_unsafe_image_give_only_the_terms_that_exist():
    t, tu, v, vu, t0, v0 = [e.float() for e in embeddings(3)]
    has = torch.tensor([True, False, True, True, False, False, True, False, True, False])
    total, terms = safeclip.twin_margin_loss(t, tu, v, vu[has], t0, v0, has_unsafe_image=has)
    # The terms on V* are over the rows that have one, the image query V(V) over every row.
    assert terms["rank_text_safe"].item() == pytest.approx(np_rank(t[has].numpy(), v[has].numpy(), vu[has].numpy(),
                                                                   safeclip.TWIN_MARGIN, safeclip.TWIN_MARGIN_TAU))
    assert terms["rank_image_unsafe"].item() == pytest.approx(np_rank(vu[has].numpy(), t[has].numpy(), tu[has].numpy(),
                                                                      safeclip.TWIN_MARGIN, safeclip.TWIN_MARGIN_TAU))
    assert terms["rank_image_safe"].item() == pytest.approx(np_rank(v.numpy(), t.numpy(), tu.numpy(),
                                                                    safeclip.TWIN_MARGIN, safeclip.TWIN_MARGIN_TAU))
    # No V* in the batch: no term that needs one, and the weights renormalised over the rest.
    none = torch.zeros(10, dtype=torch.bool)
    total, terms = safeclip.twin_margin_loss(t, tu, v, vu[none], t0, v0, has_unsafe_image=none)
    assert set(terms) == {"text_safe", "text_unsafe", "image_safe", "nce_text_safe", "nce_text_unsafe",
                          "nce_image_safe", "rank_image_safe"}
    assert torch.isfinite(total)


def test_a_gradient_step_lowers_the_unsafe_twins_score_for_every_query():
    t, tu, v, vu, t0, v0 = [e.float() for e in embeddings(4)]
    t, tu, v, vu = (x.clone().requires_grad_(True) for x in (t, tu, v, vu))
    _, terms = safeclip.twin_margin_loss(t, tu, v, vu, t0, v0, margin=0.5, tau=0.1)
    sum(terms[k] for k in RANK_TERMS).backward()
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)
    before = [cos(t, vu) - cos(t, v), cos(tu, vu) - cos(tu, v), cos(v, tu) - cos(v, t), cos(vu, tu) - cos(vu, t)]
    with torch.no_grad():
        for x in (t, tu, v, vu):
            x -= 0.05 * x.grad
        after = [cos(t, vu) - cos(t, v), cos(tu, vu) - cos(tu, v), cos(v, tu) - cos(v, t), cos(vu, tu) - cos(vu, t)]
    for b, a in zip(before, after):  # unsafe twin minus safe twin, per query: falls for (nearly) every row
        assert (a < b).float().mean() >= 0.9 and (a - b).mean() < 0


def test_its_options_are_its_own(capsys):
    with pytest.raises(SystemExit, match="--margin and --margin-tau only apply to --objective twin-margin and twin-nce"):
        safeclip.main(["train", "--data", "pairs.jsonl", "--margin", "0.2"])
    with pytest.raises(SystemExit, match="--margin-tau takes a positive number"):
        safeclip.main(["train", "--data", "pairs.jsonl", "--objective", "twin-margin", "--margin-tau", "0"])
