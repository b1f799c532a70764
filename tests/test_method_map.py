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


# safeclip.py's docstring is Part I's table of contents: each section with its main names. Each name
# must be defined in that section, so a move or rename that forgets the table fails here.
SOURCE = Path(safeclip.__file__).read_text(encoding="utf-8")
DEFINED = re.compile(r"^(?:def |class |    def )?([A-Za-z_]\w*)\b(?:\(| =|:)", re.M)


def part_one_sections():
    """{section number: its source text}, from Part I's banners ("# N. Title") to the next one."""
    part_one = SOURCE[: SOURCE.index("# PART II. THE PLUMBING")]
    starts = [(int(m.group(1)), m.start()) for m in re.finditer(r"^# (\d)\. ", part_one, re.M)]
    ends = [start for _, start in starts[1:]] + [len(part_one)]
    return {number: part_one[start:end] for (number, start), end in zip(starts, ends)}


def table_of_contents(docstring):
    """{section number: the names its row lists} from the module docstring's table."""
    table = docstring[docstring.index("The file has two parts"): docstring.index("Where each question")]
    rows, number = {}, None
    for line in table.splitlines()[1:]:
        m = re.match(r"  (\d)\. (.{24})(.*)", line)
        if m:
            number, names = int(m.group(1)), m.group(3)
        else:
            names = line
        tokens = (t.strip() for t in re.split(r"[,;()]", names))  # "(the merge)", "token ids": not names
        rows.setdefault(number, []).extend(t for t in tokens if re.fullmatch(r"[A-Za-z_]\w*", t))
    return rows


def misplaced(docstring):
    """{section: the names its row lists that the section does not define}, for the rows with any."""
    sections, toc = part_one_sections(), table_of_contents(docstring)
    assert sorted(toc) == sorted(sections) == list(range(1, 10))
    assert all(toc.values()), "a section's row lists no names"
    missing = {n: sorted(set(names) - set(DEFINED.findall(sections[n]))) for n, names in toc.items()}
    return {n: names for n, names in missing.items() if names}


def test_the_docstring_s_table_of_contents_names_what_each_section_defines():
    assert misplaced(safeclip.__doc__) == {}


def test_a_name_in_the_wrong_section_is_caught():
    doc = safeclip.__doc__.replace("infer_config, build_model", "infer_config, build_model, safe_clip_loss")
    assert misplaced(doc) == {3: ["safe_clip_loss"]}
