"""benchmarks/target_geometry.py scores a target geometry with evaluate.py's metrics. On embeddings
drawn here, where the answers follow from geometry alone: unsafe items on their twins' spots tie
with them (and evaluate.py ranks the unsafe item of a tie first); a step along a direction that no
safe item has any component in keeps every safe order (T*->V equals T->V) and puts every unsafe item
below its twin."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "target_geometry.py"
spec = importlib.util.spec_from_file_location("target_geometry", SCRIPT)
target_geometry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(target_geometry)


def safe_items(n=100, dim=24, seed=0):
    """Captions and images in the first dim - 1 coordinates (the last is left to u), each image
    near its caption."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, dim, generator=g)
    v = t + 1.5 * torch.randn(n, dim, generator=g)
    t[:, -1] = v[:, -1] = 0
    return F.normalize(t, dim=-1), F.normalize(v, dim=-1)


def test_the_twins_own_spot_ties_and_the_tie_goes_to_the_unsafe_item():
    t, v = safe_items()
    figures = target_geometry.figures({"T": t, "V": v, "T*": t, "V*": v})
    t_to_v, v_to_t, ts_to_v, vs_to_t, *unsafe_at_1 = figures
    assert (ts_to_v, vs_to_t) == (t_to_v, v_to_t)  # an unsafe item is its twin
    assert unsafe_at_1 == [100.0] * 4


def test_a_step_no_safe_item_sees_keeps_the_safe_order_and_ranks_every_unsafe_item_below_its_twin():
    t, v = safe_items(seed=1)
    u = torch.zeros(t.shape[1])
    u[-1] = 1  # orthogonal to every safe item
    stepped = target_geometry.stepped_aside({"T": t, "V": v}, u, a=0.3)
    t_to_v, v_to_t, ts_to_v, vs_to_t, *unsafe_at_1 = target_geometry.figures(stepped)
    assert 0 < t_to_v < 100 and 0 < v_to_t < 100  # a gallery that is not trivial
    assert (ts_to_v, vs_to_t) == (t_to_v, v_to_t)  # every cosine scaled by the same 1/sqrt(1 + a^2)
    # unsafe queries: cos(T*, V*) = (c - a^2) / (1 + a^2), the offsets opposed; safe queries: c / sqrt(1 + a^2)
    assert unsafe_at_1 == [0.0] * 4


def test_a_step_too_long_costs_the_redirect():
    t, v = safe_items(seed=2)
    u = target_geometry.directions({"T": t, "V": v, "T*": t, "V*": v})["gap"]  # the safe items use it
    near, far = (target_geometry.figures(target_geometry.stepped_aside({"T": t, "V": v}, u, a)) for a in (0.05, 3.0))
    assert far[2] < near[2]  # T*->V R@1: along a direction the safe items do use, a long step reorders them
