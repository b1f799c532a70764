"""The maps that lead a reader into the code must stay true. docs/method.md maps the paper to the code
by name: every `safeclip.NAME` / `evaluate.NAME` it cites must exist. safeclip.py's docstring lists each
section's main names (each must be defined there), gives each question about the method as exact
line ranges (each must be where its words say, in Part I), and section 8 states the step's defaults
(each must be what TrainConfig resolves to). A rename or move that forgets a map fails here instead of
misleading a reader."""

import ast
import re
from dataclasses import replace
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


# The docstring's question map gives exact line ranges ("lines A-B  section 6 to safe_clip_loss"), so
# that a reader can read those lines and nothing else. Each range must be where the words beside it
# say: from section N's banner, a comment that opens with the quoted words, or a definition, to the
# last line of the named definition (a definition alone: its own lines), and within Part I.
RANGE = re.compile(r'lines +(\d+)-(\d+) +(?:section (\d)|"([^"]+)"|([A-Za-z_]\w*))(?: to ([A-Za-z_]\w*))?')


def definitions(source):
    """{top-level name: (first line, last line)}, decorators included, for defs, classes and assignments."""
    spans = {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        names = [node.name] if hasattr(node, "name") else [t.id for t in getattr(node, "targets", []) if
                                                             isinstance(t, ast.Name)]
        for name in names:
            spans[name] = (first, node.end_lineno)
    return spans


def question_map(docstring):
    return docstring[docstring.index("Where each question"): docstring.index("Part II is the plumbing")]


def wrong_ranges(docstring, source):
    """[(the map's row, the row as the code has it)] for each row of the question map that is off."""
    lines, spans = source.splitlines(), definitions(source)
    part_one = source[: source.index("# PART II. THE PLUMBING")].count("\n")
    rows = [row for row in question_map(docstring).splitlines() if re.search(r"lines +\d", row)]
    assert len(rows) >= 7, "the question map gives fewer ranges than it should; has its format changed?"
    wrong = []
    for row in rows:
        m = RANGE.search(row)
        if m is None:  # a row whose format drifted is reported, not skipped
            wrong.append((row, "a row this test cannot read"))
            continue
        first, last, section, comment, name, to = m.groups()
        if section:
            start = next(i for i, line in enumerate(lines, 1) if line.startswith(f"# {section}. "))
        elif comment:
            start = next(i for i, line in enumerate(lines, 1) if line.lstrip().startswith(f"# {comment}"))
        else:
            start = spans[name][0]
        if not (to or name) or (to or name) not in spans:
            wrong.append((row, "no definition to end at"))
            continue
        end = spans[to or name][1]
        if end > part_one:
            wrong.append((row, "ends in Part II"))
        elif (int(first), int(last)) != (start, end):
            wrong.append((row, row.replace(f"lines {first}-{last}", f"lines {start}-{end}")))
    return wrong


def test_the_question_map_s_line_ranges_are_exact():
    assert wrong_ranges(safeclip.__doc__, SOURCE) == [], "the map's rows, and what they should read"


def test_a_range_that_has_drifted_is_caught():
    banner = next(i for i, line in enumerate(SOURCE.splitlines(), 1) if line.startswith("# 6. "))
    _, end = definitions(SOURCE)["safe_clip_loss"]
    lora = definitions(SOURCE)["choose_trainable"][1]  # section 4, above the change: still right
    source = SOURCE.replace("\n\ndef safe_clip_loss(", "\n\n# one more line\ndef safe_clip_loss(", 1)
    drifted = dict(wrong_ranges(safeclip.__doc__, source))
    said = next(row for row in drifted if f"lines {banner}-{end} " in row)
    assert drifted[said] == said.replace(f"lines {banner}-{end}", f"lines {banner}-{end + 1}")
    assert not any(f"-{lora} " in row for row in drifted)


def test_a_range_in_part_ii_or_unreadable_is_caught():
    run = definitions(SOURCE)["Run"]
    doc = safeclip.__doc__.replace("Part II is the plumbing",
                                   f"  the run                lines {run[0]}-{run[1]}  Run\n"
                                   "  a typo                 lines 12 - 30  section 6 to safe_clip_loss\n"
                                   "Part II is the plumbing", 1)
    assert sorted(why for _, why in wrong_ranges(doc, SOURCE)) == ["a row this test cannot read", "ends in Part II"]


def step_defaults_comment(source):
    start = source.index("# The step's defaults")
    return " ".join(line.lstrip("# ") for line in source[start: source.index("\n\n", start)].splitlines())


def stated_defaults_that_differ(comment):
    """{phrase: (what section 8's comment says, what TrainConfig resolves to)} where they differ."""
    lora = safeclip.TrainConfig(data="pairs.jsonl", device="cpu").resolved()
    wanted = {"lr": lora.lr, "weight decay": lora.weight_decay, "warm-up": lora.warmup, "grad clip": lora.grad_clip,
              "batch": lora.batch_size, "accum": lora.accum, "epochs": lora.epochs, "seed": lora.seed,
              "LoRA rank": lora.lora_rank, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout}
    number = r"(\d(?:[0-9.e-]*\d)?)"
    said = {phrase: re.search(rf"{phrase} {number}", comment) for phrase in wanted}
    said["--full"], wanted["--full"] = re.search(rf"{number} --full", comment), replace(lora, full=True, lr=None).resolved().lr
    wrong = {phrase: (m and m.group(1), wanted[phrase]) for phrase, m in said.items()
             if m is None or float(m.group(1)) != wanted[phrase]}
    precision = {device: replace(lora, device=device, precision=None).resolved().precision for device in ("cuda", "cpu")}
    for phrase, value in ((f"{lora.schedule} schedule", lora.schedule),
                          (f"precision {precision['cuda']} on CUDA, {precision['cpu']} on the CPU", precision),
                          ("on both towers", lora.freeze is None)):
        if phrase not in comment or value is False:
            wrong[phrase] = (None, value)
    return wrong


def test_section_8_states_the_step_s_defaults_as_train_config_resolves_them():
    assert stated_defaults_that_differ(step_defaults_comment(SOURCE)) == {}


def test_a_stated_default_that_differs_is_caught():
    comment = step_defaults_comment(SOURCE).replace("grad clip 1.0", "grad clip 0.5")
    assert stated_defaults_that_differ(comment) == {"grad clip": ("0.5", 1.0)}


def mapped_lines(docstring):
    """The lines of safeclip.py that the question map's ranges cover, all together."""
    return set().union(*(range(int(first), int(last) + 1) for first, last, *_ in RANGE.findall(question_map(docstring))))


def test_the_map_says_how_many_lines_its_ranges_cover_to_within_a_tenth():
    said = int(re.search(r"about (\d+) for all six,\s+train included", safeclip.__doc__).group(1))
    assert abs(said - len(mapped_lines(safeclip.__doc__))) <= len(mapped_lines(safeclip.__doc__)) / 10
