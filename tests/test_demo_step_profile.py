"""benchmarks/demo_step_profile.py, the source of docs/demo.md's figures on where a demo step's time
goes: it runs, times each of its three settings, and its operator lists show what each setting does
(LoRA's dropout draws masks; without dropout no step draws any)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import demo_step_profile  # noqa: E402


def test_it_times_the_three_settings_and_only_lora_dropout_draws_masks(capsys):
    demo_step_profile.main(["--steps", "2", "--batch", "2", "--top", "100"])
    out = capsys.readouterr().out
    sections = re.split(r"\n\n(?=\S)", out.strip())
    assert [s.split(":")[0] for s in sections[1:]] == \
        ["toy CLIP pre-training", "Safe-CLIP, LoRA dropout 0.1", "Safe-CLIP, LoRA dropout 0"]
    for section in sections[1:]:
        assert float(re.search(r": (\d+) ms a step", section).group(1)) > 0
        shares = [float(x) for x in re.findall(r"^ +(\d+\.\d)%", section, re.M)]
        assert shares == sorted(shares, reverse=True) and 95 <= sum(shares) <= 100.5
    pretraining, dropout, no_dropout = sections[1:]
    assert "aten::bernoulli_" in dropout
    assert "aten::bernoulli_" not in no_dropout and "aten::bernoulli_" not in pretraining
