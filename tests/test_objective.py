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


def np_objective(t, tu, v, vu, t0, v0, weights, scale=100.0):
    terms = [np_cosine_distance(t, t0), np_cosine_distance(tu, t0), np_cosine_distance(v, v0),
             np_cosine_distance(vu, v0), np_nce(t, v0, scale), np_nce(tu, v0, scale), np_nce(t0, v, scale),
             np_nce(t0, vu, scale)]
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


@pytest.mark.parametrize("seed", [3, 4])
def test_the_nce_scale_is_the_papers_100_unless_given(seed):
    emb = embeddings(seed)
    scale = float(torch.empty(()).uniform_(5, 60, generator=torch.Generator().manual_seed(seed)))
    total, terms = safeclip.safe_clip_loss(*[e.float() for e in emb], scale=scale)
    ref_total, ref_terms = np_objective(*[e.float().double().numpy() for e in emb], PAPER_WEIGHTS, scale)
    for name in NAMES:
        assert abs(terms[name].item() - ref_terms[name]) <= 1e-6 * max(1.0, abs(ref_terms[name])), name
    assert abs(total.item() - ref_total) <= 1e-6 * abs(ref_total)
    at_100 = np_objective(*[e.float().double().numpy() for e in emb], PAPER_WEIGHTS)[1]
    assert abs(terms["nce_image_unsafe"].item() - at_100["nce_image_unsafe"]) > 1e-3  # the scale matters


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


# -- SafeR-CLIP ----------------------------------------------------------------------------------

SAFER_NAMES = ["text_safe", "text_unsafe", "image_safe", "image_unsafe",
               "nce_text_safe", "rel_text_unsafe", "nce_image_safe", "rel_image_unsafe"]


def np_cos(a, b):
    return np.array([np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)])


def np_relative(x, unsafe_target, safe_target):
    """softplus(cos(x, unsafe) - cos(x, safe)), averaged: log(1 + exp(.)) written out."""
    return float(np.mean(np.log1p(np.exp(np_cos(x, unsafe_target) - np_cos(x, safe_target)))))


def test_safer_clip_terms_match_an_independent_computation():
    g = torch.Generator().manual_seed(11)
    t, tu, v, vu, t0, v0, t0u, v0u, tn, vn = [torch.randn(10, 16, generator=g) for _ in range(10)]
    total, terms = safeclip.safer_clip_loss(t, tu, v, vu, t0, v0, t_unsafe_ref=t0u, v_unsafe_ref=v0u, t_near=tn, v_near=vn)
    n = lambda x: x.double().numpy()
    expected = {
        "text_safe": np_cosine_distance(n(t), n(t0)), "text_unsafe": np_cosine_distance(n(tu), n(tn)),
        "image_safe": np_cosine_distance(n(v), n(v0)), "image_unsafe": np_cosine_distance(n(vu), n(vn)),
        "nce_text_safe": np_nce(n(t), n(v0)), "rel_text_unsafe": np_relative(n(tu), n(v0u), n(vn)),
        "nce_image_safe": np_nce(n(t0), n(v)), "rel_image_unsafe": np_relative(n(vu), n(t0u), n(tn)),
    }
    assert list(terms) == SAFER_NAMES == list(safeclip.SAFER_LAMBDAS)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    weights = safeclip.SAFER_LAMBDAS
    assert total.item() == pytest.approx(sum(weights[k] * expected[k] for k in expected) / sum(weights.values()), rel=1e-5)


def test_the_relative_loss_falls_as_the_safe_target_wins_and_has_no_temperature():
    x = torch.tensor([[1.0, 0.0]])
    toward_unsafe = safeclip.relative_loss(x, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    toward_safe = safeclip.relative_loss(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert toward_unsafe.item() == pytest.approx(np.log1p(np.e)) and toward_safe.item() == pytest.approx(np.log1p(1 / np.e))


def test_nearest_safe_targets_match_a_brute_force_search():
    g = torch.Generator().manual_seed(5)
    pool, queries = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    pool[3] = 10 * queries[4]  # the nearest by cosine, though not by distance
    near = safeclip.nearest_safe(queries, pool, chunk=5)  # several chunks
    for i, q in enumerate(queries.double().numpy()):
        cos = [np.dot(q, p) / np.linalg.norm(q) / np.linalg.norm(p) for p in pool.double().numpy()]
        assert near[i].item() == int(np.argmax(cos))
    assert near[4] == 3


def test_the_curriculum_goes_from_the_closest_safe_unsafe_pairs_to_all_in_thirds():
    g = torch.Generator().manual_seed(9)
    t_safe, t_unsafe = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    order = safeclip.curriculum_order(t_safe, t_unsafe)
    cos = np_cos(t_safe.double().numpy(), t_unsafe.double().numpy())
    assert order.tolist() == sorted(range(20), key=lambda i: -cos[i])
    assert [len(safeclip.curriculum_rows(order, e)) for e in range(5)] == [7, 14, 20, 20, 20]
    assert safeclip.curriculum_rows(order, 0).tolist() == order[:7].tolist()
    easy = set(safeclip.curriculum_rows(order, 0).tolist())
    assert min(cos[i] for i in easy) >= max(cos[i] for i in set(range(20)) - easy)


# -- twin-offset ---------------------------------------------------------------------------------


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_twin_offset_terms_match_an_independent_computation():
    g = torch.Generator().manual_seed(13)
    t, tu, v, vu, t0, v0 = [torch.randn(9, 12, generator=g) for _ in range(6)]
    u = torch.randn(12, generator=g)
    total, terms = safeclip.twin_offset_loss(t, tu, v, vu, t0, v0, unsafe_dir=u, offset=0.7)
    n = lambda x: x.double().numpy()
    un = np_normalize(n(u))
    t_target = np_normalize(np_normalize(n(t0)) + 0.7 * un)
    v_target = np_normalize(np_normalize(n(v0)) - 0.7 * un)
    flat = lambda x: np_normalize(x) - np.outer(np_normalize(x) @ un, un)
    expected = {
        "text_safe": np_cosine_distance(n(t), n(t0)), "text_unsafe": np_cosine_distance(n(tu), t_target),
        "image_safe": np_cosine_distance(n(v), n(v0)), "image_unsafe": np_cosine_distance(n(vu), v_target),
        "nce_text_safe": np_nce(n(t), n(v0)), "nce_text_unsafe": np_nce(flat(n(tu)), n(v0)),
        "nce_image_safe": np_nce(n(t0), n(v)), "nce_image_unsafe": np_nce(n(t0), flat(n(vu))),
    }
    assert list(terms) == list(safeclip.TWIN_OFFSET_LAMBDAS)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    weights = safeclip.TWIN_OFFSET_LAMBDAS
    assert total.item() == pytest.approx(sum(weights[k] * expected[k] for k in expected) / sum(weights.values()), rel=1e-5)


def test_the_unsafe_direction_is_where_unsafe_embeddings_exceed_safe_ones_most():
    g = torch.Generator().manual_seed(2)
    safe, unsafe = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g)
    safe[:, 2] *= 0.05  # the safe data hardly use axis 2 ...
    unsafe[:, 2] += 3  # ... the unsafe data do
    u = safeclip.unsafe_direction(safe, unsafe)
    s_, u_ = np_normalize(safe.double().numpy()), np_normalize(unsafe.double().numpy())
    values, vectors = np.linalg.eigh(u_.T @ u_ / len(u_) - s_.T @ s_ / len(s_))
    expected = vectors[:, -1] * np.sign(vectors[np.argmax(np.abs(vectors[:, -1])), -1])
    assert np.allclose(u.numpy(), expected, atol=1e-5) and abs(u[2]) > 0.9  # ... so u is about axis 2


def test_twin_offset_targets_rank_each_unsafe_item_just_below_its_safe_twin():
    """At its targets, for safe and unsafe queries alike, an unsafe item ranks below its safe twin
    and the ranking among safe items is the one of the original embeddings."""
    g = torch.Generator().manual_seed(4)
    t0 = torch.randn(30, 16, generator=g)
    v0 = t0 + 0.6 * torch.randn(30, 16, generator=g)
    t0[:, 0], v0[:, 0] = 0, 0  # the safe data leaves axis 0 unused
    t0, v0 = torch.nn.functional.normalize(t0, dim=-1), torch.nn.functional.normalize(v0, dim=-1)
    u = torch.nn.functional.one_hot(torch.tensor(0), 16).float()
    t_unsafe = torch.nn.functional.normalize(t0 + u, dim=-1)  # the targets, offset 1
    v_unsafe = torch.nn.functional.normalize(v0 - u, dim=-1)
    for query, safe, unsafe in ((t0, v0, v_unsafe), (v0, t0, t_unsafe), (t_unsafe, v0, v_unsafe), (v_unsafe, t0, t_unsafe)):
        q = torch.nn.functional.normalize(query, dim=-1)
        to_safe, to_unsafe = q @ safe.t(), q @ unsafe.t()
        assert (to_safe.diagonal() > to_unsafe.diagonal()).all()
        assert torch.equal(to_safe.argsort(dim=1), (query[:, 1:] @ safe[:, 1:].t()).argsort(dim=1))


# -- choosing an objective on the command line -----------------------------------------------------


def test_lambdas_name_the_terms_of_the_chosen_objective():
    assert safeclip.parse_lambdas("rel_image_unsafe=1", safeclip.SAFER_LAMBDAS) == {"rel_image_unsafe": 1.0}
    with pytest.raises(Exception, match="unknown term.*rel_image_unsafe"):
        safeclip.parse_lambdas("rel_image_unsafe=1")  # not a Safe-CLIP term


def test_safer_clip_brings_its_recipe_unless_the_command_line_overrides_it(monkeypatch):
    seen = []
    monkeypatch.setattr(safeclip, "train", seen.append)
    base = ["train", "--data", "d.jsonl", "--model", "m", "--out", "o"]
    for extra in (["--objective", "safer-clip"], ["--objective", "safer-clip", "--lr", "3e-3", "--batch-size", "8"],
                  ["--objective", "twin-offset"]):
        assert safeclip.main(base + extra) == 0
    assert [(a.lr, a.batch_size, a.lora_rank) for a in seen] == [(1e-4, 48, 16), (3e-3, 8, 16), (1e-3, 16, 16)]


@pytest.mark.parametrize("extra,message", [
    (["--offset", "0.5"], "--offset only applies to --objective twin-offset"),
    (["--objective", "safer-clip", "--lambdas", "text_safe=1,nce_text_unsafe=2"], "unknown term"),
])
def test_options_of_another_objective_are_refused(extra, message):
    with pytest.raises(SystemExit, match=message):
        safeclip.main(["train", "--data", "d.jsonl", "--model", "m", "--out", "o", *extra])
