"""docs/method.md maps the paper to the code by name: every `safeclip.NAME` / `evaluate.NAME` it
cites must exist, so a rename that forgets the map fails here instead of misleading a reader."""

import re
from pathlib import Path

import pytest

import evaluate
import safeclip

METHOD_MAP = Path(__file__).resolve().parents[1] / "docs" / "method.md"
MODULES = {"safeclip": safeclip, "evaluate": evaluate}
# A backticked span that is a dotted name in one of the modules, optionally called: `safeclip.LoRA`,
# `safeclip.ResidualAttentionBlock.pooled`, `safeclip.info_nce(a, b, scale=100.0)`.
CITATION = re.compile(r"`((?:safeclip|evaluate)(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`")
FILES = {"safeclip.py", "evaluate.py"}  # file names, not attributes


def citations(text):
    return sorted({name for name in CITATION.findall(text) if name not in FILES})


def missing(names):
    """The cited names that do not resolve, attribute by attribute, from their module."""
    gone = []
    for name in names:
        module, *path = name.split(".")
        obj = MODULES[module]
        for attr in path:
            if not hasattr(obj, attr):
                gone.append(name)
                break
            obj = getattr(obj, attr)
    return gone


@pytest.fixture(scope="module")
def text():
    return METHOD_MAP.read_text(encoding="utf-8")


def test_every_cited_name_exists(text):
    names = citations(text)
    assert len(names) > 50, f"only {len(names)} citations found; has the map's format changed?"
    gone = missing(names)
    assert not gone, f"docs/method.md cites names the code does not have: {', '.join(gone)}"


def test_a_name_that_does_not_exist_is_caught():
    names = citations("see `safeclip.safe_clip_loss`, `safeclip.no_such_loss` and `evaluate.top_k.nope`")
    assert missing(names) == ["evaluate.top_k.nope", "safeclip.no_such_loss"]


def test_file_names_and_calls_are_read_as_intended():
    assert citations("`safeclip.py`, `safeclip.info_nce(a, b, scale=100.0)`") == ["safeclip.info_nce"]


def test_the_map_cites_the_method_s_core():
    names = set(citations(METHOD_MAP.read_text(encoding="utf-8")))
    core = {"safe_clip_loss", "cosine_distance", "info_nce", "weighted_total", "LAMBDAS", "frozen_targets",
            "objective_inputs", "add_lora", "LoRA", "choose_trainable", "_plain_state_dict", "Towers", "embed",
            "batch_loss", "forward_backward", "accumulate", "update", "train", "build_model", "infer_config",
            "safer_clip_loss", "twin_offset_loss"}
    assert {f"safeclip.{n}" for n in core} - names == set()
    assert {"evaluate.quadruplet_metrics", "evaluate.unsafe_at_k", "evaluate.zeroshot_accuracy"} - names == set()


def test_each_of_the_eight_terms_is_listed_with_its_weight(text):
    for term, weight in safeclip.LAMBDAS.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{term}`")]
        assert len(rows) == 1, f"{term}: expected one row in the table of terms, found {len(rows)}"
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert float(cells[2]) == weight, f"{term}: the map says λ = {cells[2]}, safeclip.LAMBDAS says {weight}"
