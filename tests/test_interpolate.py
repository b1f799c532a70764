"""benchmarks/interpolate.py: theta0 + a (theta_ft - theta0) per tower, checked weight by weight on two
random CLIPs, and the written model loads with exactly those weights."""

import importlib.util
from pathlib import Path

import pytest
import torch

import safeclip

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "interpolate.py"
spec = importlib.util.spec_from_file_location("interpolate", SCRIPT)
interpolate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interpolate)

TINY = safeclip.CLIPConfig(embed_dim=16, image_resolution=16, vision_layers=2, vision_width=32, vision_patch_size=8,
                           vision_heads=2, context_length=12, vocab_size=64, text_width=32, text_heads=2,
                           text_layers=2)


def random_model(seed):
    torch.manual_seed(seed)
    model = safeclip.CLIP(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(float(seed) + 1.0)
    return model


def test_each_tower_moves_by_its_own_fraction_and_the_temperature_stays_the_tuned_one():
    tuned, base = random_model(1).state_dict(), random_model(2).state_dict()
    out = interpolate.interpolate(tuned, base, text=0.25, vision=0.75)
    for name, w in out.items():
        if name == "logit_scale":
            assert torch.equal(w, tuned[name])
            continue
        a = 0.75 if name.startswith("visual.") else 0.25
        assert torch.allclose(w, (1 - a) * base[name] + a * tuned[name], atol=1e-6), name
    ends = [interpolate.interpolate(tuned, base, text=a, vision=a) for a in (0.0, 1.0)]
    assert all(torch.equal(ends[0][k], base[k]) for k in base if k != "logit_scale")
    assert all(torch.equal(ends[1][k], tuned[k]) for k in tuned)


def test_the_written_model_loads_with_the_interpolated_weights(tmp_path):
    for seed in (1, 2):
        safeclip.save(random_model(seed), tmp_path / f"m{seed}")
    interpolate.main([str(tmp_path / "m1"), str(tmp_path / "m2"), str(tmp_path / "wise"), "--text", "0.5"])
    loaded, _ = safeclip.load(tmp_path / "wise")
    want = interpolate.interpolate(random_model(1).state_dict(), random_model(2).state_dict(), 0.5, 1.0)
    got = loaded.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_models_of_different_shapes_are_refused():
    other = safeclip.CLIP(safeclip.CLIPConfig(**{**TINY.__dict__, "text_width": 64, "text_heads": 4}))
    with pytest.raises(SystemExit, match=r"positional_embedding is \(12, 64\) in one model, \(12, 32\) in the other"):
        interpolate.interpolate(other.state_dict(), random_model(1).state_dict(), 0.5, 0.5)
