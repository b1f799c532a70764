"""twin-nce (ours, issue #34): Safe-CLIP's eight terms with the unsafe twin as one more negative in
the two redirect InfoNCE terms, plus twin-margin's hinges, those of safe queries with the unsafe
twin held constant; against a float64 NumPy oracle on random embeddings: each term, rows without V*,
the weighting, and which embeddings each hinge moves."""

import numpy as np
import pytest
import torch

import safeclip


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_rank(query, safe, unsafe, margin, tau):
    q, s, u = unit(query), unit(safe), unit(unsafe)
    gap = np.sum(q * u, axis=1) - np.sum(q * s, axis=1)
    return float(np.mean(tau * np.logaddexp(0.0, (gap + margin) / tau)))  # tau * softplus(x / tau)


def np_cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def np_twin_nce(queries, gallery, twins, has_twin, scale):
    """Query i over [gallery rows..., its own twin where it has one]; gallery row i over the queries."""
    q, g = unit(queries), unit(gallery)
    logits = scale * q @ g.T
    twin = np.full((len(q), 1), -np.inf)
    twin[has_twin, 0] = scale * np.sum(q[has_twin] * unit(twins), axis=1)
    labels = np.arange(len(q))
    return (np_cross_entropy(np.concatenate([logits, twin], 1), labels) + np_cross_entropy(logits.T, labels)) / 2


def embeddings(seed, batch=10, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(6)]


@pytest.mark.parametrize("seed,margin,tau,scale", [(0, 0.3, 0.05, 100.0), (1, 0.5, 0.1, 20.0), (2, 0.0, 0.02, 5.0)])
def test_every_term_matches_the_oracle(seed, margin, tau, scale):
    t, tu, v, vu, t0, v0 = embeddings(seed)
    total, terms = safeclip.twin_nce_loss(*[e.float() for e in (t, tu, v, vu, t0, v0)], margin=margin, tau=tau,
                                          scale=scale)
    _, eight = safeclip.safe_clip_loss(*[e.float() for e in (t, tu, v, vu, t0, v0)], scale=scale)
    assert list(terms) == list(eight) + ["rank_text_safe", "rank_text_unsafe", "rank_image_unsafe", "rank_image_safe"]
    redirect_nce = ("nce_text_unsafe", "nce_image_unsafe")
    assert all(torch.equal(terms[k], eight[k]) for k in eight if k not in redirect_nce)  # six are Safe-CLIP's
    n = lambda x: x.numpy()
    every = np.ones(len(t), dtype=bool)
    expected = {"nce_text_unsafe": np_twin_nce(n(tu), n(v0), n(vu), every, scale),  # T* over V0(V) and its V*
                "nce_image_unsafe": np_twin_nce(n(vu), n(t0), n(tu), every, scale),  # V* over T0(T) and its T*
                "rank_text_safe": np_rank(n(t), n(v), n(vu), margin, tau),  # caption queries: V over V*
                "rank_text_unsafe": np_rank(n(tu), n(v), n(vu), margin, tau),
                "rank_image_safe": np_rank(n(v), n(t), n(tu), margin, tau),  # image queries: T over T*
                "rank_image_unsafe": np_rank(n(vu), n(t), n(tu), margin, tau)}
    for name, value in expected.items():
        assert abs(terms[name].item() - value) <= 1e-5 * max(1.0, value), name
    weights = safeclip.TWIN_NCE_LAMBDAS
    ref_total = sum(weights[k] * terms[k].item() for k in terms) / sum(weights[k] for k in terms)
    assert abs(total.item() - ref_total) <= 1e-5 * abs(ref_total)


def test_the_twin_negative_is_what_changes_safe_clips_redirect_terms():
    t, tu, v, vu, t0, v0 = [e.float() for e in embeddings(5)]
    _, eight = safeclip.safe_clip_loss(t, tu, v, vu, t0, v0)
    # A twin far below every safe item adds nothing: the term is Safe-CLIP's.
    far = safeclip.twin_info_nce(tu, v0, -tu, scale=100.0)
    assert far.item() == pytest.approx(eight["nce_text_unsafe"].item(), rel=1e-5)
    # A twin that scores like the positive costs more.
    near = safeclip.twin_info_nce(tu, v0, v0, scale=100.0)
    assert near.item() > eight["nce_text_unsafe"].item()


def test_rows_without_an_unsafe_image_give_only_the_terms_that_exist():
    t, tu, v, vu, t0, v0 = [e.float() for e in embeddings(3)]
    has = torch.tensor([True, False, True, True, False, False, True, False, True, False])
    m, tau, scale = safeclip.TWIN_NCE_MARGIN, safeclip.TWIN_NCE_TAU, 100.0
    _, terms = safeclip.twin_nce_loss(t, tu, v, vu[has], t0, v0, has_unsafe_image=has)
    n = lambda x: x.numpy()
    # T* is a query on every row, with its V* as a negative where there is one.
    assert terms["nce_text_unsafe"].item() == pytest.approx(np_twin_nce(n(tu), n(v0), n(vu[has]), n(has), scale), rel=1e-5)
    assert terms["nce_image_unsafe"].item() == pytest.approx(
        np_twin_nce(n(vu[has]), n(t0[has]), n(tu[has]), np.ones(int(has.sum()), dtype=bool), scale), rel=1e-5)
    assert terms["rank_text_safe"].item() == pytest.approx(np_rank(n(t[has]), n(v[has]), n(vu[has]), m, tau))
    assert terms["rank_image_unsafe"].item() == pytest.approx(np_rank(n(vu[has]), n(t[has]), n(tu[has]), m, tau))
    assert terms["rank_image_safe"].item() == pytest.approx(np_rank(n(v), n(t), n(tu), m, tau))
    # No V* in the batch: no term that needs one, T*'s InfoNCE is Safe-CLIP's, the weights renormalised.
    none = torch.zeros(10, dtype=torch.bool)
    total, terms = safeclip.twin_nce_loss(t, tu, v, vu[none], t0, v0, has_unsafe_image=none)
    _, eight = safeclip.safe_clip_loss(t, tu, v, vu[none], t0, v0, has_unsafe_image=none)
    assert set(terms) == {"text_safe", "text_unsafe", "image_safe", "nce_text_safe", "nce_text_unsafe",
                          "nce_image_safe", "rank_image_safe"}
    assert terms["nce_text_unsafe"].item() == pytest.approx(eight["nce_text_unsafe"].item(), rel=1e-6)
    assert torch.isfinite(total)


@pytest.mark.parametrize("term,moves", [("rank_text_safe", "t v"), ("rank_text_unsafe", "tu v vu"),
                                        ("rank_image_safe", "v t"), ("rank_image_unsafe", "vu t tu")])
def test_a_hinge_step_lowers_its_gap_and_a_safe_querys_hinge_leaves_the_unsafe_item_alone(term, moves):
    x = dict(zip(("t", "tu", "v", "vu"), (e.float().requires_grad_(True) for e in embeddings(4)[:4])))
    t0, v0 = [e.float() for e in embeddings(4)[4:]]
    _, terms = safeclip.twin_nce_loss(x["t"], x["tu"], x["v"], x["vu"], t0, v0, margin=0.5, tau=0.1)
    terms[term].backward()
    # Safe queries (T over V and V*, V over T and T*): the unsafe twin is a constant, only the safe items move.
    assert {k for k, e in x.items() if e.grad is not None and e.grad.abs().sum() > 0} == set(moves.split())
    query, safe, unsafe = {"rank_text_safe": "t v vu", "rank_text_unsafe": "tu v vu",
                           "rank_image_safe": "v t tu", "rank_image_unsafe": "vu t tu"}[term].split()
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)
    gap = lambda: cos(x[query], x[unsafe]) - cos(x[query], x[safe])
    before = gap()
    with torch.no_grad():
        for k in moves.split():
            x[k] -= 0.5 * x[k].grad
        after = gap()
    assert (after < before).all()  # unsafe twin minus safe twin: falls for every query


def test_its_options_are_its_own():
    with pytest.raises(SystemExit, match="--margin and --margin-tau only apply to --objective twin-margin and twin-nce"):
        safeclip.main(["train", "--data", "pairs.jsonl", "--margin", "0.2"])
    with pytest.raises(SystemExit, match="--margin-tau takes a positive number"):
        safeclip.main(["train", "--data", "pairs.jsonl", "--objective", "twin-nce", "--margin-tau", "0"])
