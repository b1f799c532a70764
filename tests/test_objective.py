"""The Safe-CLIP objective against an independent float64 NumPy implementation of the public
code's formula (CosineDistance = 1 - cos averaged over the batch; CLIPLoss_Positive = symmetric
cross-entropy over L2-normalised embeddings with logit scale exp(4.6052) ~ 100)."""

import numpy as np
import pytest
import torch

import safeclip

NAMES = ["text_safe", "text_unsafe", "image_safe", "image_unsafe",
         "nce_text_safe", "nce_text_unsafe", "nce_image_safe", "nce_image_unsafe"]
PAPER_WEIGHTS = [0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5]


def np_cosine_distance(a, b):
    cos = [np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)]
    return float(np.mean([1 - c for c in cos]))


def np_cross_entropy(logits):
    """Mean over rows of -log softmax(row)[i], the label of row i being i."""
    losses = []
    for i, row in enumerate(logits):
        m = row.max()
        losses.append(-(row[i] - m - np.log(np.sum(np.exp(row - m)))))
    return float(np.mean(losses))


def np_nce(text, image, scale=100.0):
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    per_image = scale * image @ text.T
    per_text = scale * text @ image.T
    return 0.5 * (np_cross_entropy(per_image) + np_cross_entropy(per_text))


def np_objective(t, tu, v, vu, t0, v0, weights):
    terms = [np_cosine_distance(t, t0), np_cosine_distance(tu, t0), np_cosine_distance(v, v0),
             np_cosine_distance(vu, v0), np_nce(t, v0), np_nce(tu, v0), np_nce(t0, v), np_nce(t0, vu)]
    total = sum(w / sum(weights) * x for w, x in zip(weights, terms))
    return total, dict(zip(NAMES, terms))


def embeddings(seed, batch=12, dim=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(6)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_term_matches_the_public_formula(seed):
    emb = embeddings(seed)
    total, terms = safeclip.safe_clip_loss(*[e.float() for e in emb])
    ref_total, ref_terms = np_objective(*[e.float().double().numpy() for e in emb], PAPER_WEIGHTS)
    assert list(terms) == NAMES
    for name in NAMES:
        assert abs(terms[name].item() - ref_terms[name]) <= 1e-6 * max(1.0, abs(ref_terms[name])), name
    assert abs(total.item() - ref_total) <= 1e-6 * abs(ref_total)


def test_the_paper_weights_are_the_defaults_and_can_be_overridden():
    assert list(safeclip.LAMBDAS.values()) == PAPER_WEIGHTS
    emb = [e.float() for e in embeddings(7)]
    weights = [1, 0, 0, 0, 0, 0, 0, 3]
    total, terms = safeclip.safe_clip_loss(*emb, lambdas=dict(zip(NAMES, weights)))
    expected = 0.25 * terms["text_safe"] + 0.75 * terms["nce_image_unsafe"]
    assert torch.allclose(total, expected)


def test_identical_embeddings_give_zero_distance_and_nce_falls_with_alignment():
    t0 = torch.nn.functional.one_hot(torch.arange(8), 16).float()
    total, terms = safeclip.safe_clip_loss(t0, t0, t0, t0, t0, t0)
    for name in NAMES[:4]:
        assert terms[name].abs() < 1e-6
    # Orthogonal one-hot pairs at scale 100 make the InfoNCE vanish.
    assert terms["nce_text_safe"] < 1e-6
    # And it falls as the rows move from random toward their partners: strictly, step by step.
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    nce = [safeclip.info_nce((1 - a) * noise + a * t0, t0).item() for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(x > y for x, y in zip(nce, nce[1:])) and nce[0] > 1.0, nce


def test_gradients_reach_every_trained_embedding():
    """Bug guarded: a term cut off from the graph (a stray detach). That the references stay
    constants is the loop's job, tested in test_train.py with poisoned references."""
    emb = [e.float().requires_grad_(i < 4) for i, e in enumerate(embeddings(3))]
    total, _ = safeclip.safe_clip_loss(*emb)
    total.backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in emb[:4])


@pytest.mark.parametrize("text,expected", [
    ("0.1,0.1,0.1,0.2,0.25,0.25,0.25,0.5", dict(zip(NAMES, PAPER_WEIGHTS))),
    ("text_unsafe=2, nce_image_unsafe=0", {"text_unsafe": 2.0, "nce_image_unsafe": 0.0}),
])
def test_lambdas_parse_from_the_command_line(text, expected):
    assert safeclip.parse_lambdas(text) == expected


@pytest.mark.parametrize("text", ["1,2,3", "texts_safe=1", "a,b,c,d,e,f,g,h"])
def test_bad_lambdas_are_refused(text):
    with pytest.raises(Exception, match="--lambdas"):
        safeclip.parse_lambdas(text)
