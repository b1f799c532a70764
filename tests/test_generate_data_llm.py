"""generate_data.py against what real LLM servers do at ViSU scale (issue 18).

Refusals in their many phrasings, answers wrapped in reasoning, markdown and lead-ins, answers cut
off at max_tokens, captions in any script, a model that refuses one category for good, slow and
trickling servers, Ctrl-C, a full disk, moved sources. Every test talks to the scripted stub
server of test_generate_data.py on 127.0.0.1.
"""

import csv
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import generate_data as gd
from test_generate_data import (FAST, ROOT, manifest, ok_answer, pixel, png_bytes, rows, run,
                                stub, stub_colour, write_jsonl, write_lines)

__all__ = ["stub"]  # the fixture, imported for the tests below

# ---------------------------------------------------------------------------------------------
# Refusals and valid edits, both ways
# ---------------------------------------------------------------------------------------------

# Phrasings collected from instruction-tuned models (Llama, Qwen, Mistral, Gemma, GPT, Claude);
# straight and curly apostrophes alike.
REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I\u2019m sorry, but I can\u2019t assist with that.",
    "I'm unable to create that content.",
    "I\u2019m unable to create that content.",
    "I'm not able to help with that.",
    "No, I can't do that.",
    "I must respectfully decline this request.",
    "I cannot fulfill this request.",
    "I can't create content that depicts graphic violence.",
    "Sorry, I can't help with that.",
    "Sorry, but I won\u2019t write that.",
    "Unfortunately, I cannot generate content of this nature.",
    "Unfortunately, I\u2019m not able to rewrite this caption.",
    "As an AI language model, I cannot produce harmful content.",
    "I apologize, but I cannot comply with this request.",
    "I apologise, but I can't provide that.",
    "My apologies, but I must decline.",
    "I'm afraid I can't do that.",
    "I am not comfortable writing this caption.",
    "I'd rather not write that.",
    "This request goes against my guidelines, so I won't complete it.",
    "I cannot provide a caption that promotes self-harm.",
    "I will not create content that sexualizes minors.",
    "Creating such content would violate my content policy.",
    "I'm sorry, I cannot assist with generating unsafe captions.",
    "I can\u2019t comply with that.",
    "I\u2019m really sorry, but I can\u2019t produce that.",
    "I'm not going to write that.",
    "That's not something I can help with.",
    "I refuse to generate this content.",
    "I'm sorry \u2014 I can't help with that.",
    "Sorry, that\u2019s not something I can do.",
    "I cannot and will not produce that content.",
    "I do not feel comfortable completing this request.",
    "I can't assist with requests involving child abuse.",
    "It is not appropriate for me to create this content.",
    "Regrettably, I am unable to assist with that.",
    "I'm programmed to avoid generating harmful content.",
    "This content violates OpenAI's usage policies.",
    "I won't be able to help with this one.",
    "I have to decline this request.",
    "Apologies, but I can't continue with this.",
    "Nope, I won't write that.",
    "I would prefer not to describe that.",
    "I'm designed to be helpful and harmless, so I cannot write this.",
    # Refusals that quote the caption or a word: what they quote is left out, not the refusal.
    "I'm sorry, but I can't rewrite \"A dog on a sofa.\" into violent content.",
    "I won't add 'blood' to this caption.",
    "Sorry, I can\u2019t write \u201cA man beating a dog\u201d or anything like it.",
    "I cannot turn \u2018a dog on a sofa\u2019 into something harmful.",
]

# Minimal, valid unsafe edits that merely contain "no", "not", "can't", "won't", "sorry", ...
VALID_EDITS = [
    "A man who can't stop vomiting on a crowded bus.",
    "No one helps the bleeding cyclist lying in the street.",
    "A dog with no fur, its skin covered in open wounds, on a sofa.",
    "A kitchen with no lights where a man snorts cocaine off the counter.",
    "A child who can't breathe, a plastic bag over his head, in a park.",
    "A sign reading no entry next to a hanged man.",
    "A woman who cannot walk, beaten by two men in an alley.",
    "Two men with no shirts fighting with broken bottles in a bar.",
    "A cat that can't escape a burning box in the yard.",
    "A street where no cars drive past the looted shops.",
    "A man who won't stop kicking a dog in the snow.",
    "A bathroom where nobody notices the overdosed teenager on the floor.",
    "A soldier who could not save his friend, covered in blood, on a beach.",
    "A classroom with no teacher where students pass around a loaded gun.",
    "A girl saying sorry to the man who slapped her in a kitchen.",
    "A man holding a sorry-looking puppy by its throat on a porch.",
    "Unfortunate hikers trapped under a rockslide, bleeding on a trail.",
    "A man cannot hide the knife in his hand at the bus stop.",
    "A pizza with no cheese, covered in crawling maggots, on a table.",
    "An old woman who can't see the thief taking her purse on a bench.",
    "A room with nothing but a noose hanging from the ceiling.",
    "A boy who doesn't notice the syringe he steps on in the park.",
    "A horse that won't move while its owner whips it bloody in a field.",
    "Two teenagers spray painting \"no future\" on a church wall.",
    "A train station where no guard stops a man groping a sleeping woman.",
    "A tennis player who can not hold his racket, his wrist slashed, on a court.",
    "A giraffe with no head lying in a pool of blood at the zoo.",
    "A bride who cannot stop crying as her groom slaps her at the altar.",
    "A man giving the middle finger to a crowd, with no shirt, in a stadium.",
    "A pile of pills and no water bottle on a nightstand beside a motionless man.",
    "A bus that didn't stop, running over a cyclist on the road.",
    "A skateboarder who isn't wearing a helmet, his skull cracked open on the ramp.",
    # Quoted words are content, not the model speaking: a sign, a shout, a note.
    "A protester holding a sign that says \"I can't breathe\" while police beat him.",
    "A woman screaming \"I won't go with you\" as a man drags her into a van.",
    "A man with a bloody nose yelling \"I'm sorry, I'm sorry\" at the bouncer who hit him.",
    "A door sprayed with 'No, I cannot forgive you' and riddled with bullet holes.",
    "A hostage holding a note that says \u201cI am unable to pay\u201d with a gun to her head.",
    "A teenager\u2019s T-shirt printed \u2018I\u2019m not sorry\u2019 soaked in blood at a party.",
    "A drunk man slurring \"I do not care\" as he pours beer over a crying child.",
    "A robot whose screen reads \"As an AI language model, I cannot comply\" crushing a skull.",
    "A crowd chanting \u00abI refuse to obey\u00bb while setting a police car on fire.",
    "A note reading \"I can't go on\" next to a bathtub full of blood.",
]


@pytest.mark.parametrize("answer", REFUSALS)
def test_refusals_are_rejected(answer):
    assert len(REFUSALS) >= 30
    assert gd.check_answer(gd.clean_answer(answer), "A dog on a sofa.") == "refusal"
    assert gd.check_answer(gd.clean_answer(f'"{answer}"'), "A dog on a sofa.") == "refusal"


@pytest.mark.parametrize("answer", VALID_EDITS)
def test_valid_edits_with_negative_words_are_kept(answer):
    assert len(VALID_EDITS) >= 30
    assert gd.clean_answer(answer) == answer
    assert gd.check_answer(answer, "A photo of something.") is None


# ---------------------------------------------------------------------------------------------
# Wrappers around an answer
# ---------------------------------------------------------------------------------------------

EDIT = "A man riding a bike down a street, beating a pedestrian with a metal pipe."
WRAPPED = [
    f"Here is the rewritten caption: {EDIT}",
    f"Here's the rewritten caption:\n\n{EDIT}",
    f"Sure! Here is the unsafe version of the caption:\n{EDIT}",
    f"**Unsafe caption:** {EDIT}",
    f"**{EDIT}**",
    f"*{EDIT}*",
    f"Rewritten caption: \"{EDIT}\"",
    f"\u201c{EDIT}\u201d",
    f"<think>\nThe user wants violence. Keep the scene. Add a pipe.\n</think>\n\n{EDIT}",
    f"<think>Okay. Caption: a bike.</think>**Caption:** \"{EDIT}\"",
    f"The user wants violence; I will add a weapon.\n</think>\n{EDIT}",  # template sent <think>
    f"Output: {EDIT}",
    f"> {EDIT}",
    f"`{EDIT}`",
]


@pytest.mark.parametrize("answer", WRAPPED)
def test_wrappers_are_stripped(answer):
    assert gd.clean_answer(answer) == EDIT
    assert gd.check_answer(gd.clean_answer(answer), "A man riding a bike down a street.") is None


def test_reasoning_without_an_answer_leaves_nothing():
    assert gd.clean_answer("<think>The user wants violence. Let me think about the") == ""
    assert gd.check_answer("", "A cat.") == "empty"


# Captions whose own words look like a sentence end, and captions in other scripts.
@pytest.mark.parametrize("caption, answer, problem", [
    ("A U.S. Navy ship in a harbour.", "A U.S. Navy ship in a harbour, its deck covered in "
                                       "bodies.", None),
    ("A statue of St. Francis in a garden.", "A statue of St. Francis in a garden, smeared "
                                             "with blood.", None),
    ("A U.S. Navy ship in a harbour.", "A U.S. Navy ship in a harbour. Bodies float by.",
     "extra_sentences"),
    ("Кошка сидит на диване.", "Кошка сидит на диване с окровавленным ножом.", None),
    ("Кошка сидит на диване.", "Кошка сидит на диване!", "copy"),
    ("Кошка сидит на диване.", "Кошка сидит на диване. Рядом лежит труп.", "extra_sentences"),
    ("一只猫坐在沙发上。", "一只猫坐在沙发上，嘴里叼着一把带血的刀。", None),
    ("一只猫坐在沙发上。", "一只猫坐在沙发上！", "copy"),
    ("一只猫坐在沙发上。", "一只猫坐在沙发上。旁边有一具尸体。", "extra_sentences"),
    ("A cat.", "...", "empty"),
])
def test_checks_compare_an_answer_with_its_caption_in_any_script(caption, answer, problem):
    assert gd.check_answer(answer, caption) == problem


def _llm_args(stub, source, out, *more):
    return ("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
            "--out", out, *FAST, *more)


def test_server_refusals_wrappers_and_cut_offs_never_become_captions(stub, tmp_path):
    captions = ["A U.S. Navy ship in a harbour.", "Кошка сидит на диване.",
                "一只猫坐在沙发上。"] + [f"A photo of thing {k} on a table." for k in range(6)]
    stub.script = {
        captions[3]: [{"content": "I\u2019m unable to create that content."},
                      {"content": "Sorry, I can't help with that."}],
        captions[4]: [{"content": "Here is the rewritten caption:\n\nA photo of thing 1 on "
                                  "a table, next to a severed hand."}],
        captions[5]: [{"content": "beating a pedestrian with a", "finish_reason": "length"}],
        captions[6]: [{"content": "<think>Let me add blood.</think>\n**Unsafe caption:** "
                                  "\"A photo of thing 3 on a table, soaked in blood.\""}],
        captions[7]: [{"content": "I must respectfully decline this request."}] * 9,
        captions[1]: [{"content": "Кошка сидит на диване."},
                      {"content": "Кошка сидит на диване с окровавленным ножом."}],
        captions[2]: [{"content": "一只猫坐在沙发上。"}, {"content": "一只猫坐在沙发上，满身是血。"}],
    }
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    assert run(*_llm_args(stub, source, out, "--retries", 2, "--workers", 2)) == 0
    done = {r["safe"]: r for r in rows(out)}
    assert set(done) == set(captions) - {captions[7]}
    assert done[captions[0]]["unsafe"] == ok_answer(captions[0], done[captions[0]]["category"])
    assert done[captions[1]]["unsafe"] == "Кошка сидит на диване с окровавленным ножом."
    assert done[captions[2]]["unsafe"] == "一只猫坐在沙发上，满身是血。"
    assert done[captions[4]]["unsafe"] == "A photo of thing 1 on a table, next to a severed hand."
    assert done[captions[6]]["unsafe"] == "A photo of thing 3 on a table, soaked in blood."
    assert done[captions[5]]["unsafe"] == ok_answer(captions[5], done[captions[5]]["category"])
    llm = manifest(out)["requests"]["llm"]
    assert llm["invalid_refusal"] == 2 + 3 and llm["invalid_cut_off"] == 1
    assert llm["invalid_copy"] == 2
    assert manifest(out)["rejected"][0]["reason"] == "invalid_refusal"


def test_captions_that_quote_refusal_words_are_rewritten_not_rejected(stub, tmp_path):
    captions = ["A protester holding a sign that says \"I can't breathe\" on a street.",
                "A boy in a T-shirt printed 'Sorry, not sorry' on a beach.",
                "A poster reading \u201cI will not give up\u201d on a wall."]
    source = write_lines(tmp_path / "c.txt", captions)
    assert run(*_llm_args(stub, source, tmp_path / "out", "--retries", 0)) == 0
    done = rows(tmp_path / "out")
    assert [r["unsafe"] for r in done] == [ok_answer(c, r["category"])
                                           for c, r in zip(captions, done)]
    assert stub.count("chat") == 3 and "invalid_refusal" not in manifest(tmp_path / "out")[
        "requests"]["llm"]


def test_wrapped_answer_through_the_server(stub, tmp_path):
    caption = "A man riding a bike down a street."
    stub.script = {caption: [{"content": w} for w in WRAPPED]}
    source = write_lines(tmp_path / "c.txt", [caption] * len(WRAPPED))
    assert run(*_llm_args(stub, source, tmp_path / "out", "--retries", 0, "--workers", 1)) == 0
    assert [r["unsafe"] for r in rows(tmp_path / "out")] == [EDIT] * len(WRAPPED)


# ---------------------------------------------------------------------------------------------
# Keep rules, BOMs, URLs
# ---------------------------------------------------------------------------------------------

KEEP_RULES = '''
import numpy as np
import torch

def numpy_pick(images, prompt, kind):
    return np.argmax([image.getpixel((0, 0))[0] for image in images])

def torch_pick(images, prompt, kind):
    return torch.tensor([image.getpixel((0, 0))[0] for image in images]).argmin()

def float_pick(images, prompt, kind):
    return 1.0
'''


@pytest.mark.parametrize("rule, choose", [("numpy_pick", np.argmax), ("torch_pick", np.argmin)])
def test_keep_rule_may_return_numpy_or_torch_integers(stub, tmp_path, rule, choose):
    (tmp_path / "rules.py").write_text(KEEP_RULES)
    source = write_jsonl(tmp_path / "c.jsonl", [{"caption": "a cat", "unsafe": "a dead cat"}])
    out = tmp_path / "out"
    assert run("--captions", source, "--t2i", stub.url, "--keep-rule",
               f"{tmp_path / 'rules.py'}:{rule}", "--seeds-per-prompt", 3, "--image-size", 8,
               "--out", out, *FAST) == 0
    (row,) = rows(out)
    reds = [stub_colour("a dead cat", j)[0] for j in range(3)]
    assert pixel(out / row["unsafe_image"]) == stub_colour("a dead cat", int(choose(reds)))


def test_keep_rule_returning_a_float_stops_with_one_line(stub, tmp_path, capsys):
    (tmp_path / "rules.py").write_text(KEEP_RULES)
    source = write_jsonl(tmp_path / "c.jsonl", [{"caption": "a cat", "unsafe": "a dead cat"}])
    assert run("--captions", source, "--t2i", stub.url, "--keep-rule",
               f"{tmp_path / 'rules.py'}:float_pick", "--image-size", 8, "--out",
               tmp_path / "out", *FAST) == 1
    assert "the keep rule returned 1.0" in capsys.readouterr().err


def test_files_with_a_byte_order_mark_are_read_as_their_format(stub, tmp_path):
    bom = "\ufeff"
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(bom + json.dumps({"caption": "a cat", "unsafe": "a dead cat"}) + "\n"
                     + json.dumps({"caption": "a dog", "unsafe": "a dead dog"}) + "\n",
                     encoding="utf-8")
    listed = tmp_path / "c.json"
    listed.write_text(bom + json.dumps([{"caption": "a cow"}]), encoding="utf-8")
    text = tmp_path / "c.txt"
    text.write_text(bom + "a bird on a wire\n", encoding="utf-8")
    assert run("--captions", jsonl, "--text-only", "--out", tmp_path / "a") == 0
    assert [(r["safe"], r["unsafe"]) for r in rows(tmp_path / "a")] == [("a cat", "a dead cat"),
                                                                      ("a dog", "a dead dog")]
    assert run(*_llm_args(stub, listed, tmp_path / "b")) == 0
    assert [r["safe"] for r in rows(tmp_path / "b")] == ["a cow"]
    assert run(*_llm_args(stub, text, tmp_path / "c")) == 0
    assert [r["safe"] for r in rows(tmp_path / "c")] == ["a bird on a wire"]
    assert {key for _, _, key, _, _ in stub.log} == {"a cow", "a bird on a wire"}


@pytest.mark.parametrize("flag, url", [("--llm", "localhost:8112"), ("--llm", "myhost"),
                                       ("--t2i", "127.0.0.1:9000"), ("--llm", "ftp://host")])
def test_url_without_a_scheme_is_refused_at_once(stub, tmp_path, capsys, flag, url):
    source = write_lines(tmp_path / "c.txt", ["a cat"])
    other = ("--llm-model", "m") if flag == "--llm" else ("--llm", stub.url, "--llm-model", "m")
    with pytest.raises(SystemExit) as exit_:
        run("--captions", source, flag, url, *other, *(() if flag == "--t2i" else
                                                        ("--text-only",)),
            "--out", tmp_path / "out", *FAST)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {url}: expected a URL starting with http:// or https://" in err
    assert stub.log == [] and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Resume: a refused category, splits, batched commits, moved sources
# ---------------------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, answers):
    """Ctrl-C in the main thread once `answers` LLM answers came in (undo with .undo())."""
    original, count = gd.Job.keep_answer, {"n": 0}

    def keep_answer(self, item, unsafe):
        count["n"] += 1
        if count["n"] > answers:
            raise KeyboardInterrupt
        original(self, item, unsafe)

    monkeypatch.setattr(gd.Job, "keep_answer", keep_answer)


@pytest.mark.parametrize("first_run", ["ctrl-c", "kill -9"])
def test_a_refused_category_never_stops_a_resumed_run(stub, tmp_path, monkeypatch, first_run):
    captions = [f"A photo of street number {k}." for k in range(120)]
    stub.by_category = {"harassment": "refusal"}  # the model refuses one category, always
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    args = _llm_args(stub, source, out, "--categories", "violence,harassment", "--retries", 1,
                     "--workers", 4)
    if first_run == "ctrl-c":
        _interrupt_after(monkeypatch, 40)
        assert run(*args) == 130
        monkeypatch.undo()
    else:  # a kill leaves manifest.json a few seconds behind
        stub.latency = 0.05
        process = subprocess.Popen([sys.executable, str(ROOT / "generate_data.py"),
                                    *map(str, args)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        answers, rejections = out / "unsafe_captions.jsonl", out / "rejected.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and not (
                answers.exists() and rejections.exists()  # answers come a second at a time
                and rejections.read_bytes().count(b"\n") >= 30):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        stub.latency = 0.0
    ids = {f"{k:06d}": c for k, c in enumerate(captions)}
    rejected_before = {ids[r["id"]] for r in gd.JsonlLog(out / "rejected.jsonl").rows}
    assert len(rejected_before) >= 25  # more than would trip the breaker back to back
    answered = {a["id"] for a in gd.JsonlLog(out / "unsafe_captions.jsonl").rows}
    asked = []
    for extra in ((), ("--retry-rejected",), ()):
        mark = len(stub.log)
        assert run(*args, *extra) == 0
        asked.append({key for _, _, key, _, _ in stub.log[mark:]})
    sent = {key: info["category"] for _, _, key, _, info in stub.log}
    refused = {c for c in captions if sent[c] == "harassment"}
    assert asked[0] == {c for k, c in enumerate(captions)  # every new item, and only those
                        if f"{k:06d}" not in answered and c not in rejected_before}
    assert asked[1] == refused  # --retry-rejected: the refused items, once more, after that
    assert asked[2] == set()  # nothing left to ask

    done = rows(out)
    accepted = [c for c in captions if sent[c] == "violence"]
    assert [r["safe"] for r in done] == accepted  # every accepted row, once, and no other
    assert all(r["unsafe"] == ok_answer(r["safe"], "violence") for r in done)
    m = manifest(out)
    assert m["status"] == "complete" and m["retry_rejected"] is False
    assert {r["safe"] for r in m["rejected"]} == refused
    assert {r["runs"] for r in m["rejected"]} == {2} and {r["reason"] for r in m["rejected"]} == {
        "invalid_refusal"}
    assert m["counts"] == {**m["counts"], "items": 120, "rows": len(accepted),
                           "rejected": 120 - len(accepted), "not_retried": 120 - len(accepted),
                           "pending": 0}


@pytest.mark.parametrize("n, fractions, sizes", [
    (5, (0.5, 0.5, 0.0), [3, 2, 0]),
    (165_001, (0.5, 0.5, 0.0), [82_501, 82_500, 0]),
    (3, (0.8, 0.1, 0.1), [1, 1, 1]),
    (2, (0.8, 0.1, 0.1), [1, 1, 0]),
    (1, (0.8, 0.1, 0.1), [1, 0, 0]),
    (11, (0.7, 0.2, 0.1), [8, 2, 1]),
    (10, (1 / 3, 1 / 3, 1 / 3), [4, 3, 3]),
    (1000, (0.8, 0.1, 0.1), [800, 100, 100]),
    (7, (0.0, 0.0, 1.0), [0, 0, 7]),
    (4, (0.0, 0.9, 0.1), [0, 3, 1]),
])
def test_split_sizes_follow_the_largest_remainder_and_zero_means_none(n, fractions, sizes):
    assert gd.split_sizes(n, fractions) == sizes
    assigned = gd.assign_splits([f"{i:06d}" for i in range(n)], fractions, seed=1)
    assert [list(assigned.values()).count(s) for s in gd.SPLITS] == sizes


def test_split_sizes_add_up_and_stay_within_one_row_of_their_quota():
    rng = np.random.default_rng()
    for _ in range(2000):
        n = int(rng.integers(0, 2000))
        weights = rng.random(3) * (rng.random(3) < 0.7)
        if weights.sum() == 0:
            continue
        fractions = tuple(float(w) for w in weights / weights.sum())
        sizes = gd.split_sizes(n, fractions)
        assert sum(sizes) == n
        assert all(s == 0 for s, f in zip(sizes, fractions) if f == 0)
        quotas = [f * n for f in fractions]
        if all(q >= 1 for q, f in zip(quotas, fractions) if f > 0):  # no split is topped up
            assert all(abs(s - q) < 1 + 1e-9 for s, q in zip(sizes, quotas))


def test_a_zero_split_gets_no_row_and_tiny_runs_get_every_split(stub, tmp_path):
    five = write_lines(tmp_path / "five.txt", [f"a cat number {k}" for k in range(5)])
    assert run(*_llm_args(stub, five, tmp_path / "a", "--split", "0.5,0.5,0")) == 0
    assert Counter(r["split"] for r in rows(tmp_path / "a")) == {"train": 3, "val": 2}
    three = write_lines(tmp_path / "three.txt", [f"a dog number {k}" for k in range(3)])
    assert run(*_llm_args(stub, three, tmp_path / "b")) == 0
    assert Counter(r["split"] for r in rows(tmp_path / "b")) == {"train": 1, "val": 1, "test": 1}


def test_text_only_answers_and_rows_are_committed_in_batches(stub, tmp_path, monkeypatch):
    captions = [f"A photo of thing {k}." for k in range(300)]
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    syncs, real_fsync = Counter(), os.fsync

    def fsync(fd):
        syncs[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    start = time.monotonic()
    assert run(*_llm_args(stub, source, out, "--workers", 4)) == 0
    seconds = time.monotonic() - start
    assert [r["safe"] for r in rows(out)] == captions
    answers = gd.JsonlLog(out / "unsafe_captions.jsonl").rows
    assert sorted(a["id"] for a in answers) == [f"{k:06d}" for k in range(300)]
    # 300 answers and 300 rows in batches of 64, plus at most one commit per second of the run
    # each (an fsync per answer was 300).
    for name in ("unsafe_captions.jsonl", "pairs.jsonl"):
        assert 1 <= syncs[name] <= 300 // 64 + 1 + seconds, (name, syncs, seconds)


def _stopped_after_three_answers(stub, tmp_path, monkeypatch, captions):
    """A run over `captions` (in tmp_path/a/captions.txt) interrupted after 3 answers: (source, out)."""
    (tmp_path / "a").mkdir()
    source = write_lines(tmp_path / "a" / "captions.txt", captions)
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 3)
    assert run(*_llm_args(stub, source, out, "--workers", 1)) == 130
    monkeypatch.undo()
    return source, out


def test_a_moved_source_resumes_and_a_changed_one_is_refused(stub, tmp_path, monkeypatch,
                                                             capsys):
    captions = [f"a horse number {k} in a field" for k in range(8)]
    source, out = _stopped_after_three_answers(stub, tmp_path, monkeypatch, captions)

    moved = tmp_path / "b" / "renamed.txt"
    moved.parent.mkdir()
    source.rename(moved)
    mark = len(stub.log)
    capsys.readouterr()
    assert run(*_llm_args(stub, moved, out, "--workers", 1)) == 0
    err = capsys.readouterr().err
    assert f"note: the source moved from {source} to {moved}" in err
    assert len(stub.log) - mark == 8 - 3  # the three saved answers were kept
    assert [r["safe"] for r in rows(out)] == captions
    assert manifest(out)["source_file"] == str(moved)
    assert "sha256" in manifest(out)["recipe"]["source"]

    write_lines(moved, captions + ["one more caption"])
    assert run(*_llm_args(stub, moved, out)) == 2
    assert "source differ" in capsys.readouterr().err


@pytest.mark.parametrize("hashed", [True, False])
def test_a_folder_whose_recipe_names_its_source_by_path_resumes_by_content(
        stub, tmp_path, monkeypatch, capsys, hashed):
    captions = [f"a goat number {k} on a hill" for k in range(8)]
    source, out = _stopped_after_three_answers(stub, tmp_path, monkeypatch, captions)
    # The manifest as older versions wrote it: the recipe names the file by its path (with its
    # hash, as every earlier version did, or without), and there is no source_file.
    old = manifest(out)
    del old["source_file"]
    old["recipe"]["source"]["file"] = str(source.resolve())
    if not hashed:
        del old["recipe"]["source"]["sha256"]
    (out / "manifest.json").write_text(json.dumps(old))

    (tmp_path / "b").mkdir()
    changed = write_lines(tmp_path / "b" / "changed.txt", captions[:-1] + ["a sheep"])
    assert run(*_llm_args(stub, changed, out, "--workers", 1)) == 2
    assert "(source differ)" in capsys.readouterr().err
    assert manifest(out) == old  # a refused run writes nothing

    moved = tmp_path / "b" / "renamed.txt"
    if hashed:
        source.rename(moved)  # the recipe's hash vouches for the content
    else:
        shutil.copy(source, moved)  # the file named by the recipe is there to compare with
    mark = len(stub.log)
    assert run(*_llm_args(stub, moved, out, "--workers", 1)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "moved" in line]
    assert notes == [f"note: the source moved from {source.resolve()} to {moved.resolve()}; its "
                     f"content is the same, so the run resumes"]
    assert len(stub.log) - mark == 8 - 3  # the three saved answers were kept
    assert [r["safe"] for r in rows(out)] == captions
    now = manifest(out)  # rewritten in today's form
    assert now["source_file"] == str(moved.resolve()) and "file" not in now["recipe"]["source"]
    assert now["recipe"]["source"]["sha256"] == hashlib.sha256(moved.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Slow servers, Ctrl-C, a full disk
# ---------------------------------------------------------------------------------------------


# A child that turns Ctrl-C into KeyboardInterrupt, as Python does in a terminal, even when the
# tests run as a background job (a shell starts those with SIGINT ignored, and Python then leaves
# it ignored).
CTRL_C = "import signal, sys, generate_data as gd; signal.signal(signal.SIGINT, signal.default_int_handler); "


def test_timeout_bounds_the_whole_request_not_each_read(stub, tmp_path):
    stub.script = {"a slow cat": ["trickle"]}  # ~110 bytes at one per 0.1 s: 11 s in all
    source = write_lines(tmp_path / "c.txt", ["a slow cat", "a quick dog"])
    out = tmp_path / "out"
    start = time.monotonic()
    assert run("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
               "--timeout", 1, "--retries", 0, "--out", out) == 0
    assert time.monotonic() - start < 8  # a per-read timeout would take 11 s; 8 leaves room for a loaded machine
    assert [r["safe"] for r in rows(out)] == ["a quick dog"]
    assert [(r["safe"], r["reason"]) for r in manifest(out)["rejected"]] == [("a slow cat",
                                                                              "timeout")]


def test_ctrl_c_stops_waiting_for_requests_in_flight(stub, tmp_path):
    captions = [f"a quick cat number {k}" for k in range(6)] + ["a stuck dog", "a stuck cow"]
    stub.script = {c: ["hang"] for c in captions[6:]}  # the server never answers these
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C + "sys.exit(gd.main(sys.argv[1:]))", "--captions", str(source),
         "--llm", stub.url, "--llm-model", "stub", "--text-only", "--workers", "8", "--timeout", "60",
         "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        answers = out / "unsafe_captions.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                stub.count("chat") == 8 and answers.exists()
                and answers.read_bytes().count(b"\n") == 6):
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = process.communicate(timeout=50)
        # The hung requests would hold it for the 60 s timeout; 20 s leaves room for a loaded machine.
        assert time.monotonic() - start < 20, "Ctrl-C waited for the requests in flight"
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert "run the same command again to resume" in err
    # A Ctrl-C just after a batch's write, before the batch left its list, writes it once more on
    # the way out; the run reads answers by id, so the copy changes nothing.
    assert sorted({a["id"] for a in gd.JsonlLog(answers).rows}) == [f"{k:06d}" for k in range(6)]
    assert manifest(out)["status"] == "interrupted"


def test_answers_that_arrived_before_a_ctrl_c_are_saved(stub, tmp_path, monkeypatch):
    captions = [f"a sleepy cat number {k}" for k in range(4)]
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    original, kept = gd.Job.keep_answer, []

    def keep_answer(self, item, unsafe):  # Ctrl-C while the first answer is being saved
        original(self, item, unsafe)
        kept.append(item.id)
        if len(kept) == 1:
            time.sleep(1.0)  # meanwhile the three other answers arrive
            raise KeyboardInterrupt

    monkeypatch.setattr(gd.Job, "keep_answer", keep_answer)
    assert run(*_llm_args(stub, source, out, "--workers", 4)) == 130
    assert stub.count("chat") == 4
    saved = gd.JsonlLog(out / "unsafe_captions.jsonl").rows
    assert sorted(a["id"] for a in saved) == ["000000", "000001", "000002", "000003"]
    monkeypatch.undo()
    mark = len(stub.log)
    assert run(*_llm_args(stub, source, out, "--workers", 4)) == 0
    assert len(stub.log) == mark  # nothing asked twice
    assert [r["safe"] for r in rows(out)] == captions


# generate_data.py with answers and rows committed by count only, so that what is staged when a
# run stops does not depend on timing.
BY_COUNT = CTRL_C + "gd.COMMIT_EVERY_S = 3600; sys.exit(gd.main(sys.argv[1:]))"


@pytest.mark.parametrize("signal_", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill -9"])
def test_a_stopped_run_keeps_its_answers_and_a_resume_asks_only_for_the_rest(stub, tmp_path,
                                                                            signal_):
    quick = [f"a calm lake number {k}" for k in range(100)]
    stuck = [f"a stuck boat number {k}" for k in range(8)]  # they hold the 8 workers at the end
    stub.script = {c: ["hang"] for c in stuck}
    source = write_lines(tmp_path / "c.txt", quick + stuck)
    out = tmp_path / "out"
    args = _llm_args(stub, source, out, "--workers", 8, "--timeout", 60)
    process = subprocess.Popen([sys.executable, "-c", BY_COUNT, *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # 16 items are in flight at a time, so the last is sent only after at least 92 answers
        # came in: 64 of them are committed, the others staged.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and stub.count("chat") < 108:
            time.sleep(0.01)
        process.send_signal(signal_)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait()
    saved = {a["id"] for a in gd.JsonlLog(out / "unsafe_captions.jsonl").rows}
    ids = {f"{k:06d}" for k in range(100)}
    if signal_ == signal.SIGINT:  # Ctrl-C writes the staged answers first
        assert process.returncode == 130, err
        assert 92 <= len(saved) and saved <= ids
        assert manifest(out)["status"] == "interrupted"
    else:  # a kill loses the staged batch, and only that
        assert process.returncode == -signal.SIGKILL
        assert len(saved) == 64 and saved <= ids

    stub.script = {}
    mark = len(stub.log)
    assert run(*args) == 0
    asked = [key for _, _, key, _, _ in stub.log[mark:]]
    assert sorted(asked) == sorted(c for k, c in enumerate(quick + stuck)
                                   if f"{k:06d}" not in saved)
    assert [r["safe"] for r in rows(out)] == quick + stuck  # every row, once, in order


def test_a_fatal_error_keeps_the_answers_that_came_before_it(stub, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(gd, "COMMIT_EVERY_S", 3600)  # so the answers are still staged
    captions = [f"a red kite number {k}" for k in range(20)]
    stub.script = {captions[12]: ["401"]}
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    original, kept = gd.Job.keep_answer, []

    def keep_answer(self, item, unsafe):
        kept.append(item.id)
        original(self, item, unsafe)

    monkeypatch.setattr(gd.Job, "keep_answer", keep_answer)
    assert run(*_llm_args(stub, source, out, "--workers", 2)) == 1
    assert "HTTP 401" in capsys.readouterr().err
    saved = [a["id"] for a in gd.JsonlLog(out / "unsafe_captions.jsonl").rows]
    # Two workers: item 12 is sent only once items 0-10 have come back (item 11 may still be out).
    assert len(kept) >= 11 and sorted(saved) == sorted(kept)
    assert manifest(out)["status"] == "stopped"
    monkeypatch.undo()
    mark = len(stub.log)
    assert run(*_llm_args(stub, source, out, "--workers", 2)) == 0
    assert sorted(key for _, _, key, _, _ in stub.log[mark:]) == sorted(
        c for k, c in enumerate(captions) if f"{k:06d}" not in kept)
    assert [r["safe"] for r in rows(out)] == captions


def test_a_full_disk_keeps_the_answers_that_fit(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gd, "COMMIT_EVERY_S", 3600)  # answers are committed 64 at a time
    captions = [f"a white swan number {k}" for k in range(100)]
    source = write_lines(tmp_path / "c.txt", captions)
    out = tmp_path / "out"
    real_write, room = os.write, {}

    def write(fd, data):  # the disk fills up 1,000 bytes after the first batch of answers
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) != "unsafe_captions.jsonl":
            return real_write(fd, data)
        size = os.fstat(fd).st_size
        room.setdefault("limit", size + len(data) + 1000)
        if size >= room["limit"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[:room["limit"] - size])

    monkeypatch.setattr(os, "write", write)
    assert run(*_llm_args(stub, source, out, "--workers", 4)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"error: {out}: no space left on device; free some space, then run the same command "
        f"again to resume"]
    assert manifest(out)["status"] == "interrupted"
    data = (out / "unsafe_captions.jsonl").read_bytes()
    assert data.endswith(b"\n") and room["limit"] - 200 < len(data) <= room["limit"]
    saved = {a["id"] for a in gd.JsonlLog(out / "unsafe_captions.jsonl").rows}  # whole lines
    assert 64 < len(saved) < 100

    monkeypatch.undo()
    mark = len(stub.log)
    assert run(*_llm_args(stub, source, out, "--workers", 4)) == 0
    assert sorted(key for _, _, key, _, _ in stub.log[mark:]) == sorted(
        c for k, c in enumerate(captions) if f"{k:06d}" not in saved)
    assert [r["safe"] for r in rows(out)] == captions


@pytest.mark.parametrize("where", ["image", "pairs.jsonl", "manifest"])
def test_a_full_disk_stops_with_one_line_and_resumes_once_freed(stub, tmp_path, monkeypatch,
                                                               capsys, where):
    records = [{"caption": f"a boat number {k}", "unsafe": f"a burning boat number {k}"}
               for k in range(6)]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out"
    args = ("--captions", source, "--t2i", stub.url, "--image-size", 8, "--workers", 2,
            "--out", out, *FAST)

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() raises it: no file

    if where == "image":
        original_png, saved = gd.save_png, []

        def save_png(image, path):
            saved.append(path)
            if len(saved) > 5:
                raise full
            original_png(image, path)

        monkeypatch.setattr(gd, "save_png", save_png)
    elif where == "pairs.jsonl":
        original_append = gd.JsonlLog.append

        def append(self, *rows_):
            if self.path.name == "pairs.jsonl":
                raise full
            original_append(self, *rows_)

        monkeypatch.setattr(gd.JsonlLog, "append", append)
    else:  # the disk fills up completely: not even the manifest can be written
        original_write, writes = Path.write_bytes, []

        def write_bytes(self, data):
            writes.append(self)
            if len(writes) > 4:
                original_write(self, data[:3])  # the first bytes fit
                raise full
            return original_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line == f"error: {out}: no space left on device" + (
        " (manifest.json still says running)" if where == "manifest" else "") + (
        "; free some space, then run the same command again to resume")
    assert manifest(out)["status"] == ("running" if where == "manifest" else "interrupted")
    assert not list(out.rglob("*.tmp-*"))  # no half-written file is left behind

    monkeypatch.undo()
    assert run(*args) == 0
    assert [r["safe"] for r in rows(out)] == [r["caption"] for r in records]
    assert manifest(out)["status"] == "complete"



# ---------------------------------------------------------------------------------------------
# The documentation's examples (README.md and docs/, where docs/data.md holds them)
# ---------------------------------------------------------------------------------------------


def test_documented_nsfwcaps_examples_run_as_printed(stub, tmp_path, monkeypatch):
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    commands = re.findall(r"^python generate_data\.py (--from-nsfwcaps [^#\n]*)", text, re.M)
    assert commands
    for k, command in enumerate(commands):
        args = shlex.split(command)
        folder = tmp_path / str(k)
        folder.mkdir()
        monkeypatch.chdir(folder)
        stub.files = {f"/nocaps/{j}.png": png_bytes((j, 2, 3)) for j in range(3)}
        records = [{"image_coco_url": f"{stub.url}/nocaps/{j}.png", "caption": f"a dog {j}",
                    "nsfw_caption": f"a dog {j} biting a child", "chosen_category": "violence"}
                   for j in range(3)]
        source = Path(args[args.index("--from-nsfwcaps") + 1])
        if source.suffix == ".csv":
            with open(source, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
        else:
            source.write_text(json.dumps(records), encoding="utf-8")
        assert gd.main(args) == 0, command
        out = Path(args[args.index("--out") + 1])
        done = rows(out)
        assert [(r["safe"], r["unsafe"]) for r in done] == [
            (r["caption"], r["nsfw_caption"]) for r in records]
        assert [(out / r["safe_image"]).read_bytes() for r in done] == list(stub.files.values())
