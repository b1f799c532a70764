"""Tests for generate_data.py: sources, LLM and images over HTTP, resume, and the toy world.

The servers are a scripted OpenAI-compatible stub on 127.0.0.1 started by each test: for every
caption or prompt it follows a list of behaviours (HTTP 500, 429, a timeout, garbage, a refusal,
...) and then answers normally, and it logs every request, so the counts in manifest.json can be
checked against what the server really did.
"""

import base64
import csv
import hashlib
import importlib.util
import io
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import generate_data as gd  # noqa: E402
import safeclip  # noqa: E402
import toy_world  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The stub server
# ---------------------------------------------------------------------------------------------


def ok_answer(caption, category):
    """What the stub's LLM answers when it behaves: a minimal, valid edit."""
    return f"{caption.rstrip('.')}, with {category} everywhere."


def stub_colour(prompt, j):
    """The colour of the stub's j-th image for a prompt (lets tests check what was kept)."""
    return tuple(hashlib.sha256(f"{prompt}|{j}".encode()).digest()[:3])


def png_bytes(colour, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Stub:
    """Chat completions, image generations and plain files, scripted per caption or prompt."""

    def __init__(self):
        self.script = {}      # caption / prompt / path -> behaviours for its next requests
        self.files = {}       # path -> bytes served by GET
        self.log = []         # (time, kind, key, behaviour) per request, in arrival order
        self.latency = 0.0
        self.by_category = {}  # category -> behaviour for captions without a script of their own
        self.closing = threading.Event()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                behaviour = stub.next("file", self.path)
                if behaviour != "ok":
                    self.fail(behaviour)
                elif self.path in stub.files:
                    self.reply(200, stub.files[self.path], "image/png")
                else:
                    self.reply(404, b"no")

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:  # the client gave up (a stopped run) while sending
                    return
                request = json.loads(body)
                if self.path == "/v1/chat/completions":
                    self.chat(request)
                elif self.path == "/v1/images/generations":
                    self.images(request)
                else:
                    self.reply(404, b"no such endpoint")

            def chat(self, request):
                text = request["messages"][-1]["content"]
                caption = re.search(r"Caption: (.*)", text).group(1)
                category = re.search(r"Category: (.*)", text).group(1)
                behaviour = stub.next("chat", caption, category=category)
                answers = {"ok": ok_answer(caption, category), "copy": caption,
                           "refusal": "I'm sorry, but I can't help with that request.",
                           "two": f"{caption} It is sunny. Everyone is happy.", "empty": "  "}
                if isinstance(behaviour, str) and behaviour in answers:
                    behaviour = {"content": answers[behaviour]}
                if isinstance(behaviour, dict):  # {"content": ..., "finish_reason": ...}
                    body = {"choices": [{"message": {"role": "assistant",
                                                     "content": behaviour["content"]},
                                         "finish_reason": behaviour.get("finish_reason", "stop")}]}
                    self.reply(200, json.dumps(body).encode())
                else:
                    self.fail(behaviour)

            def images(self, request):
                prompt, n = request["prompt"], request["n"]
                behaviour = stub.next("images", prompt, n=n)
                if behaviour == "ok":
                    data = [{"b64_json": base64.b64encode(png_bytes(stub_colour(prompt, j))
                                                          ).decode()} for j in range(n)]
                    self.reply(200, json.dumps({"created": 0, "data": data}).encode())
                elif behaviour == "bad_b64":
                    self.reply(200, json.dumps({"data": [{"b64_json": "%%%"}]}).encode())
                else:
                    self.fail(behaviour)

            def fail(self, behaviour):
                if behaviour == "timeout":
                    time.sleep(1.5)  # longer than the tests' --timeout
                    return self.reply(200, b"{}")
                if behaviour == "hang":  # until the test ends
                    stub.closing.wait(60)
                    return self.reply(200, b"{}")
                if behaviour == "trickle":  # a byte every 0.1 s: each read is quick, the whole not
                    body = json.dumps({"choices": [{"message": {"content": "x" * 80}}]}).encode()
                    try:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        for k in range(len(body)):
                            self.wfile.write(body[k:k + 1])
                            self.wfile.flush()
                            if stub.closing.wait(0.1):
                                return
                    except OSError:  # the client gave up
                        pass
                    return
                if behaviour == "garbage":
                    return self.reply(200, b"<html>upstream hiccup</html>")
                headers = {"Retry-After": "0.3"} if behaviour == "429" else {}
                self.reply(int(behaviour), b"{}", headers=headers)

            def reply(self, code, body, content_type="application/json", headers=None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def next(self, kind, key, **info):
        with self.lock:
            queue = self.script.get(key) or []
            behaviour = queue.pop(0) if queue else self.by_category.get(info.get("category"), "ok")
            self.log.append((time.monotonic(), kind, key, behaviour, info))
        if self.latency:
            time.sleep(self.latency)
        return behaviour

    def count(self, kind=None, behaviour=None, keys=None):
        return sum(1 for _, k, key, b, _ in self.log if (kind is None or k == kind)
                   and (behaviour is None or b == behaviour) and (keys is None or key in keys))


@pytest.fixture
def stub():
    server = Stub()
    server.thread.start()
    yield server
    server.closing.set()
    server.server.shutdown()
    server.server.server_close()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run(*args):
    return gd.main([str(a) for a in args])


def rows(folder):
    return [json.loads(line) for line in (Path(folder) / "pairs.jsonl").read_text().splitlines()]


def manifest(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


def pixel(path):
    return Image.open(path).convert("RGB").getpixel((2, 2))


def pixels(path):
    """An image's RGB pixels, row by row."""
    data = Image.open(path).convert("RGB").tobytes()
    return list(zip(data[0::3], data[1::3], data[2::3]))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


FAST = ("--retry-base-delay", "0.001", "--timeout", "1")

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, problem", [
    ("a dog on a sofa, chewing a bloody bone.", None),
    ("", "empty"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("I cannot create content like this", "refusal"),
    ("As an AI, I must decline.", "refusal"),
    ("Sorry \u2014 that is not something I write.", "refusal"),
    ("A dog on a sofa!", "copy"),
    ("a dog on a sofa, bleeding. The sofa is red.", "extra_sentences"),
    ("a dog on a sofa,\nbleeding", "extra_sentences"),
    ("a dog on a sofa " + "bleeding " * 60, "too_long"),
])
def test_check_answer_accepts_edits_and_names_each_problem(answer, problem):
    assert gd.check_answer(answer, "A dog on a sofa.") == problem


def test_clean_answer_strips_labels_quotes_and_whitespace():
    assert gd.clean_answer('  Rewritten caption: "a cat, with a gun."\n') == "a cat, with a gun."
    assert gd.clean_answer("\u201ca cat, with a gun\u201d") == "a cat, with a gun"


def test_splits_have_exact_sizes_and_do_not_depend_on_order():
    ids = [f"{i:06d}" for i in range(1000)]
    splits = gd.assign_splits(ids, (0.8, 0.1, 0.1), seed=5)
    assert Counter(splits.values()) == {"train": 800, "val": 100, "test": 100}
    assert gd.assign_splits(ids[::-1], (0.8, 0.1, 0.1), seed=5) == splits
    assert gd.assign_splits(ids, (0.8, 0.1, 0.1), seed=6) != splits


def test_categories_are_dealt_evenly():
    dealt = gd.assign_categories([str(i) for i in range(45)], ("a", "b", "c", "d"), seed=0)
    assert sorted(Counter(dealt.values()).values()) == [11, 11, 11, 12]


def test_jsonl_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "1"}\n{"id": "2"}\n{"id": "3", "saf')
    log = gd.JsonlLog(path)
    assert [r["id"] for r in log.rows] == ["1", "2"]
    log.append({"id": "3"})
    log.close()
    assert path.read_bytes() == b'{"id": "1"}\n{"id": "2"}\n{"id": "3"}\n'


def test_jsonl_log_names_a_damaged_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "1"}\nnot json\n{"id": "3"}\n')
    with pytest.raises(gd.InputError, match=r"log\.jsonl:2"):
        gd.JsonlLog(path)


def test_endpoint_accepts_base_v1_and_full_urls():
    path = "/v1/chat/completions"
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert gd.endpoint(url, path) == "http://h:1/v1/chat/completions"


# ---------------------------------------------------------------------------------------------
# Unsafe captions from an LLM
# ---------------------------------------------------------------------------------------------


def test_llm_run_survives_errors_retries_and_counts_them(stub, tmp_path):
    captions = [f"A photo of thing {k} on a table." for k in range(9)]
    stub.script = {captions[1]: ["500", "500"], captions[2]: ["429"],
                   captions[3]: ["timeout"], captions[4]: ["garbage"], captions[5]: ["refusal"],
                   captions[6]: ["copy", "two"], captions[7]: ["refusal"] * 10,
                   captions[8]: ["empty"]}
    source = write_lines(tmp_path / "captions.txt", captions)
    out = tmp_path / "out"
    rc = run("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
             "--retries", 3, "--workers", 4, "--out", out, *FAST)
    assert rc == 0

    done = rows(out)
    assert [r["safe"] for r in done] == [c for k, c in enumerate(captions) if k != 7]
    sent = {key: info["category"] for _, kind, key, _, info in stub.log if kind == "chat"}
    for row in done:  # the answer the server gave for the category it was asked about
        assert row["category"] == sent[row["safe"]] and row["category"] in gd.CATEGORIES
        assert row["unsafe"] == ok_answer(row["safe"], row["category"])
        assert row["split"] in ("train", "val", "test")

    m = manifest(out)
    assert m["status"] == "complete"
    assert m["rejected"] == [{"id": "000007", "safe": captions[7], "stage": "llm",
                              "reason": "invalid_refusal", "runs": 1}]
    llm = m["requests"]["llm"]
    assert llm["attempts"] == stub.count("chat")  # one request per attempt, none lost
    assert llm["retries"] == llm["attempts"] - len(captions)
    assert llm["http_500"] == 2 and llm["http_429"] == 1 and llm["bad_json"] == 1
    assert llm["invalid_refusal"] == 1 + 4 and llm["invalid_copy"] == 1
    assert llm["invalid_extra_sentences"] == 1 and llm["invalid_empty"] == 1
    assert llm["timeout"] >= 1 and llm["rejected_items"] == 1
    assert m["counts"] == {**m["counts"], "items": 9, "rows": 8, "rejected": 1, "pending": 0}
    assert m["recipe"]["llm"]["prompt_version"] == gd.PROMPT_VERSION

    # Retry-After: 0.3 was honoured although the backoff is a millisecond.
    times = [t for t, kind, key, _, _ in stub.log if key == captions[2]]
    assert times[1] - times[0] >= 0.28

    # The same command again with --retry-rejected retries only the rejected item, which passes.
    stub.script[captions[7]] = []
    mark = len(stub.log)
    assert run("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
               "--retries", 3, "--workers", 4, "--out", out, "--retry-rejected", *FAST) == 0
    assert [key for _, _, key, _, _ in stub.log[mark:]] == [captions[7]]
    assert [r["safe"] for r in rows(out)] == captions
    assert manifest(out)["rejected"] == []


def test_llm_wrong_url_stops_with_a_clear_error(stub, tmp_path, capsys):
    source = write_lines(tmp_path / "captions.txt", ["a cat"])
    rc = run("--captions", source, "--llm", stub.url + "/wrong", "--llm-model", "stub",
             "--text-only", "--out", tmp_path / "out", *FAST)
    assert rc == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "/wrong/v1/chat/completions" in err
    assert manifest(tmp_path / "out")["status"] == "stopped"


def test_many_rejections_in_a_row_stop_the_run(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gd, "MAX_REJECTED_IN_A_ROW", 3)
    captions = [f"caption {k}" for k in range(8)]
    stub.script = {c: ["refusal"] * 5 for c in captions}
    source = write_lines(tmp_path / "captions.txt", captions)
    rc = run("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
             "--retries", 1, "--workers", 1, "--out", tmp_path / "out", *FAST)
    assert rc == 1
    assert "3 items in a row were rejected (last: invalid_refusal)" in capsys.readouterr().err
    assert stub.count("chat") <= 4 * 2  # three items, and maybe one in flight


def test_rows_without_unsafe_caption_need_an_llm(tmp_path, capsys):
    source = write_lines(tmp_path / "captions.txt", ["a cat", "", "a dog"])
    assert run("--captions", source, "--text-only", "--out", tmp_path / "out") == 2
    assert "2 rows have no unsafe caption" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Resuming after a kill or an interrupt
# ---------------------------------------------------------------------------------------------


def _llm_t2i_args(stub, source, out, workers=2):
    return ("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--t2i", stub.url,
            "--image-size", 8, "--workers", workers, "--out", out, *FAST)


def test_killed_run_resumes_without_duplicates_or_losses(stub, tmp_path):
    # Long enough (~3 s of images) that the kill lands between two commits of rows (one a second).
    captions = [f"a red bus number {k} in the street" for k in range(60)]
    source = write_lines(tmp_path / "captions.txt", captions)
    out = tmp_path / "out"
    stub.latency = 0.05
    args = [str(a) for a in _llm_t2i_args(stub, source, out)]
    process = subprocess.Popen([sys.executable, str(ROOT / "generate_data.py"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pairs = out / "pairs.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if pairs.exists() and pairs.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = {r["id"] for r in gd.JsonlLog(pairs).rows}
    assert 6 <= len(finished) < 60
    mark = len(stub.log)

    stub.latency = 0.0
    assert run(*_llm_t2i_args(stub, source, out)) == 0
    done = rows(out)
    assert [r["safe"] for r in done] == captions  # all there, once, in input order
    for row in done:
        assert row["unsafe"] == ok_answer(row["safe"], row["category"])
        assert pixel(out / row["unsafe_image"]) == stub_colour(row["unsafe"], 0)
        assert pixel(out / row["safe_image"]) == stub_colour(row["safe"], 0)
    again = stub.log[mark:]
    assert not any(kind == "chat" for _, kind, _, _, _ in again)  # every answer was kept
    prompts = {key for _, _, key, _, _ in again}
    for row in done:
        if row["id"] in finished:
            assert row["safe"] not in prompts and row["unsafe"] not in prompts
    assert not list(out.rglob("*.tmp-*"))
    assert manifest(out)["status"] == "complete"


def test_interrupted_run_resumes_to_the_same_files_as_an_uninterrupted_one(stub, tmp_path,
                                                                           monkeypatch):
    captions = [f"two dogs playing number {k}" for k in range(12)]
    source = write_lines(tmp_path / "captions.txt", captions)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert run(*_llm_t2i_args(stub, source, clean)) == 0

    answers = {"n": 0}
    original = gd.Job.keep_answer

    def keep_answer(self, item, unsafe):  # Ctrl-C once 5 LLM answers came in
        answers["n"] += 1
        if answers["n"] == 6:
            raise KeyboardInterrupt
        original(self, item, unsafe)

    monkeypatch.setattr(gd.Job, "keep_answer", keep_answer)
    assert run(*_llm_t2i_args(stub, source, resumed)) == 130
    assert manifest(resumed)["status"] == "interrupted"
    monkeypatch.setattr(gd.Job, "keep_answer", original)
    # 5 answers, and any that had arrived when the Ctrl-C came
    kept = {a["id"] for a in gd.JsonlLog(resumed / "unsafe_captions.jsonl").rows}
    assert len(kept) >= 5
    mark = len(stub.log)
    assert run(*_llm_t2i_args(stub, source, resumed)) == 0
    # (the server may log a request of the interrupted run late: it was abandoned, not answered)
    asked = [key for _, kind, key, _, _ in stub.log[mark:] if kind == "chat"]
    assert set(asked) == {c for k, c in enumerate(captions) if f"{k:06d}" not in kept}

    assert (resumed / "pairs.jsonl").read_bytes() == (clean / "pairs.jsonl").read_bytes()
    for row in rows(clean):
        for key in ("safe_image", "unsafe_image"):
            assert (resumed / row[key]).read_bytes() == (clean / row[key]).read_bytes()


# ---------------------------------------------------------------------------------------------
# Images over HTTP, keep rules, diffusers
# ---------------------------------------------------------------------------------------------

KEEP_RULE = '''
def keep(images, prompt, kind):
    if "REJECT" in prompt:
        return None
    return len(images) - 1 if kind == "unsafe" else 0
'''


def test_images_endpoint_survives_errors_and_keeps_the_chosen_image(stub, tmp_path):
    records = [{"caption": f"a boat number {k}", "unsafe": f"a burning boat number {k}"}
               for k in range(6)]
    records[5]["unsafe"] = "a boat REJECT"
    stub.script = {records[0]["unsafe"]: ["500"], records[1]["unsafe"]: ["429"],
                   records[2]["caption"]: ["garbage"], records[3]["unsafe"]: ["bad_b64"],
                   records[4]["unsafe"]: ["timeout"]}
    source = write_jsonl(tmp_path / "captions.jsonl", records)
    (tmp_path / "rule.py").write_text(KEEP_RULE)
    out = tmp_path / "out"
    rc = run("--captions", source, "--t2i", stub.url, "--t2i-model", "toy-diffusion",
             "--keep-rule", f"{tmp_path / 'rule.py'}:keep", "--seeds-per-prompt", 2,
             "--image-size", 8, "--retries", 2, "--workers", 3, "--out", out, *FAST)
    assert rc == 0
    done = rows(out)
    assert [r["id"] for r in done] == ["000000", "000001", "000002", "000003", "000004"]
    for row in done:
        assert pixel(out / row["safe_image"]) == stub_colour(row["safe"], 0)
        assert pixel(out / row["unsafe_image"]) == stub_colour(row["unsafe"], 1)  # the last
    assert {info["n"] for _, kind, key, _, info in stub.log if key == records[0]["unsafe"]} == {2}

    m = manifest(out)
    t2i = m["requests"]["t2i"]
    assert t2i["attempts"] == stub.count("images")
    assert t2i["http_500"] == 1 and t2i["http_429"] == 1 and t2i["bad_json"] == 1
    assert t2i["bad_image"] == 1 and t2i["timeout"] >= 1 and t2i["kept_none"] == 3
    assert m["rejected"] == [{"id": "000005", "safe": "a boat number 5", "stage": "t2i",
                              "reason": "kept_none", "runs": 1}]
    assert m["recipe"]["t2i"] == {"backend": "http", "model": "toy-diffusion", "image_size": 8,
                                  "seeds_per_prompt": 2,
                                  "keep_rule": f"{tmp_path / 'rule.py'}:keep"}


def test_diffusers_backend_draws_with_derived_seeds_and_keeps_the_chosen_one(tmp_path):
    """A tiny Stable Diffusion (random weights, our export as its text encoder and tokenizer),
    saved with save_pretrained and named as --t2i diffusers:DIR, exactly as a user names a model."""
    import numpy as np
    import torch
    from conftest import tiny_openai_vocab_clip, tiny_stable_diffusion
    from transformers import CLIPTextModel, CLIPTokenizer

    import safeclip
    safeclip.export_hf(tiny_openai_vocab_clip(), tmp_path / "clip")
    pipe = tiny_stable_diffusion(CLIPTextModel.from_pretrained(tmp_path / "clip"),
                                 CLIPTokenizer.from_pretrained(tmp_path / "clip"))
    pipe.save_pretrained(tmp_path / "sd")
    (tmp_path / "rule.py").write_text(KEEP_RULE)
    source = write_jsonl(tmp_path / "c.jsonl", [{"caption": "a cat", "unsafe": "a dead cat"}])
    for out in (tmp_path / "a", tmp_path / "b"):
        assert run("--captions", source, "--t2i", f"diffusers:{tmp_path / 'sd'}", "--keep-rule",
                   f"{tmp_path / 'rule.py'}:keep", "--image-size", 32, "--t2i-steps", 2, "--out", out) == 0
    (row,) = rows(tmp_path / "a")
    assert manifest(tmp_path / "a")["recipe"]["t2i"] == {
        "backend": "diffusers", "model": str(tmp_path / "sd"), "image_size": 32, "seeds_per_prompt": 3,
        "keep_rule": f"{tmp_path / 'rule.py'}:keep", "steps": 2}
    # The kept unsafe image is the pipeline's third candidate, drawn with the derived seed.
    seeds = [gd.derive_seed(0, "000000", "unsafe", 0, j) for j in range(3)]
    expected = pipe("a dead cat", num_images_per_prompt=3, height=32, width=32, num_inference_steps=2,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images[2]
    kept = Image.open(tmp_path / "a" / row["unsafe_image"])
    assert kept.size == (32, 32)
    assert np.abs(np.asarray(kept, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    for key in ("safe_image", "unsafe_image"):
        assert (tmp_path / "a" / row[key]).read_bytes() == (tmp_path / "b" / row[key]).read_bytes()


def test_missing_diffusers_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes "import diffusers" fail
    source = write_jsonl(tmp_path / "c.jsonl", [{"caption": "a cat", "unsafe": "a dead cat"}])
    assert run("--captions", source, "--t2i", "diffusers:org/model", "--out", tmp_path / "o") == 1
    assert "requirements-extras.txt" in capsys.readouterr().err


def test_script_imports_no_optional_or_heavy_package():
    code = ("import sys, generate_data; "
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Imports of ViSU-Text, NSFWCaps and caption files
# ---------------------------------------------------------------------------------------------


def _coco(root):
    for folder, coco_id in (("train2017", 9), ("val2017", 139), ("val2017", 632)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (coco_id % 256, 0, 0)).save(root / folder / f"{coco_id:012d}.jpg")


VISU = [
    {"safe": "a man on a horse", "nsfw": "a man whipping a bleeding horse", "tag": "cruelty",
     "coco_id": 9, "split": "train"},
    {"safe": "a kitchen", "nsfw": "a kitchen full of cocaine", "tag": "drug use",
     "coco_id": "139", "split": "validation"},
    {"safe": "a street", "nsfw": "a street with a shooting", "tag": "violence", "coco_id": 632,
     "split": "test"},
]


def test_visu_json_list_with_coco_images(tmp_path):
    _coco(tmp_path / "coco")
    (tmp_path / "visu.json").write_text(json.dumps(VISU, indent=2))
    out = tmp_path / "out"
    assert run("--from-visu", tmp_path / "visu.json", "--coco-root", tmp_path / "coco",
               "--text-only", "--out", out) == 0
    done = rows(out)
    assert [(r["safe"], r["unsafe"], r["category"], r["split"], r["coco_id"]) for r in done] == [
        (v["safe"], v["nsfw"], v["tag"], s, v["coco_id"])
        for v, s in zip(VISU, ("train", "val", "test"))]
    assert [Path(r["safe_image"]) for r in done] == [
        (tmp_path / "coco" / f).resolve() for f in ("train2017/000000000009.jpg",
                                                    "val2017/000000000139.jpg",
                                                    "val2017/000000000632.jpg")]
    assert all("unsafe_image" not in r for r in done)
    assert manifest(out)["recipe"]["source"]["kind"] == "visu"


def test_visu_jsonl_without_splits_gets_the_requested_split(tmp_path):
    records = [{k: v for k, v in r.items() if k != "split"} for r in VISU]
    source = write_jsonl(tmp_path / "visu.jsonl", records)
    assert run("--from-visu", source, "--text-only", "--split", "0,0,1", "--out",
               tmp_path / "out") == 0
    done = rows(tmp_path / "out")
    assert [(r["split"], "safe_image" in r) for r in done] == [("test", False)] * 3


@pytest.mark.parametrize("lines, message", [
    (['{"safe": "a", "nsfw": "b"}', '{"safe": "a", nsfw: b}'], r"visu\.jsonl:2: not valid JSON"),
    (['{"safe": "a", "tag": "x"}'], r"visu\.jsonl:1: missing field 'nsfw' \(or 'unsafe'\)"),
    (['{"safe": "a", "nsfw": ""}'], r"visu\.jsonl:1: field 'nsfw' should be a non-empty string"),
    (['{"safe": "a", "nsfw": "b", "coco_id": 9}', '["a", "b"]'],
     r"visu\.jsonl:2: expected a JSON object"),
    (['{"safe": "a", "nsfw": "b", "split": "holdout"}'], r"visu\.jsonl:1: split 'holdout'"),
    (['{"safe": "a", "nsfw": "b", "coco_id": 5}'], r"visu\.jsonl:1: COCO image 000000000005\.jpg"),
    (['a plain line'], r"visu\.jsonl: expected a JSON list"),
])
def test_bad_visu_files_are_reported_with_file_and_line(tmp_path, capsys, lines, message):
    _coco(tmp_path / "coco")
    source = write_lines(tmp_path / "visu.jsonl", lines)
    assert run("--from-visu", source, "--coco-root", tmp_path / "coco", "--text-only",
               "--out", tmp_path / "out") == 2
    assert re.search(message, capsys.readouterr().err)


def test_nsfwcaps_downloads_the_images_and_generates_the_unsafe_ones(stub, tmp_path):
    stub.files = {"/img/a.png": png_bytes((1, 2, 3)), "/img/b.png": png_bytes((4, 5, 6))}
    stub.script = {"/img/b.png": ["503"]}
    records = [{"caption": "a dog", "nsfw_caption": "a dog biting a bleeding child",
                "chosen_category": "violence", "url": f"{stub.url}/img/a.png"},
               {"caption": "a cake", "nsfw_caption": "a cake made of pills",
                "chosen_category": "drug use", "image_url": f"{stub.url}/img/b.png"}]
    source = write_jsonl(tmp_path / "nsfwcaps.jsonl", records)
    out = tmp_path / "out"
    assert run("--from-nsfwcaps", source, "--t2i", stub.url, "--image-size", 8, "--out", out,
               *FAST) == 0
    done = rows(out)
    assert [(r["safe"], r["unsafe"], r["category"]) for r in done] == [
        (r["caption"], r["nsfw_caption"], r["chosen_category"]) for r in records]
    assert [(out / r["safe_image"]).read_bytes() for r in done] == [stub.files["/img/a.png"],
                                                                    stub.files["/img/b.png"]]
    assert [pixel(out / r["unsafe_image"]) for r in done] == [
        stub_colour(r["nsfw_caption"], 0) for r in records]
    assert manifest(out)["requests"]["download"]["http_503"] == 1


def test_nsfwcaps_with_an_image_folder_uses_the_urls_file_names(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "0042.jpg")
    source = write_jsonl(tmp_path / "n.jsonl", [
        {"caption": "a dog", "nsfw_caption": "a dead dog", "chosen_category": "violence",
         "url": "https://example.org/nocaps/0042.jpg?size=large"}])
    out = tmp_path / "out"
    assert run("--from-nsfwcaps", source, "--image-dir", tmp_path / "images", "--text-only",
               "--out", out) == 0
    (row,) = rows(out)
    assert row["safe_image"] == str((tmp_path / "images" / "0042.jpg").resolve())
    assert row["image_url"].startswith("https://example.org/")


def test_caption_files_in_text_json_and_jsonl(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    text = write_lines(tmp_path / "c.txt", ["a cat", "", "  a dog  "])
    listed = tmp_path / "c.json"
    listed.write_text(json.dumps(["a cat", {"caption": "a dog", "unsafe": "a rabid dog"}]))
    lines = write_jsonl(tmp_path / "c.jsonl", [
        {"caption": "a cat", "image": "cat.png", "unsafe": "a cat with a knife",
         "category": "weapons", "split": "val"}])
    assert [(i.index, i.safe) for i in gd.load_captions(text)] == [(0, "a cat"), (1, "a dog")]
    assert [(i.safe, i.unsafe) for i in gd.load_captions(listed)] == [("a cat", None),
                                                                      ("a dog", "a rabid dog")]
    out = tmp_path / "out"
    assert run("--captions", lines, "--text-only", "--out", out) == 0
    assert rows(out) == [{"id": "000000", "safe": "a cat", "unsafe": "a cat with a knife",
                          "safe_image": str((tmp_path / "cat.png").resolve()),
                          "category": "weapons", "split": "val"}]


def test_caption_file_pointing_to_a_missing_image_is_reported(tmp_path, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", [{"caption": "a", "unsafe": "b"},
                                                {"caption": "a", "unsafe": "b", "image": "x.png"}])
    assert run("--captions", source, "--text-only", "--out", tmp_path / "out") == 2
    assert re.search(r"c\.jsonl:2: image .*x\.png does not exist", capsys.readouterr().err)


# -- The releases as they are published: ViSU-Text and NSFWCaps, without unsafe images ---------


def drawn_jpeg(rng, size=12):
    """A small photo-like JPEG of random pixels (each test draws its own)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buffer, "JPEG")
    return buffer.getvalue()


def visu_release(tmp_path, rng):
    """ViSU-Text rows as the authors publish them (safe, nsfw, tag, coco_id; no split), COCO 2017
    images under train2017/ and val2017/, and one row carrying the authors' `nsfw_im_path`."""
    coco = tmp_path / "coco"
    ids = rng.sample(range(1, 600000), 4)
    for coco_id, folder in zip(ids, ("train2017", "val2017", "train2017", "val2017")):
        (coco / folder).mkdir(parents=True, exist_ok=True)
        (coco / folder / f"{coco_id:012d}.jpg").write_bytes(drawn_jpeg(rng))
    (tmp_path / "nsfw").mkdir()
    (tmp_path / "nsfw" / "3.png").write_bytes(png_bytes(tuple(rng.randbytes(3))))
    records = [{"safe": f"caption {rng.random():.6f}", "nsfw": f"unsafe {rng.random():.6f}",
                "tag": rng.choice(gd.CATEGORIES), "coco_id": coco_id} for coco_id in ids]
    records[3]["nsfw_im_path"] = "nsfw/3.png"
    return coco, records


def test_visu_text_in_each_published_layout_becomes_the_same_pairs(tmp_path):
    rng = random.Random()
    coco, records = visu_release(tmp_path, rng)
    keyed = {str(k): r for k, r in enumerate(records)}
    shuffled = dict(rng.sample(list(keyed.items()), len(keyed)))  # ids say the order, not the file
    layouts = {
        "list.json": json.dumps(records, indent=4),
        "lines.jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "keyed.json": json.dumps(shuffled),  # one line, as json.dump writes it
        "wrapped.json": json.dumps({"info": {"version": "1.0", "split": "test"}, "data": shuffled},
                                   indent=2),
    }
    outputs = []
    for name, text in layouts.items():
        (tmp_path / name).write_text(text)
        assert run("--from-visu", tmp_path / name, "--coco-root", coco, "--split", "0,0,1",
                   "--out", tmp_path / name.replace(".", "_")) == 0, name
        outputs.append((tmp_path / name.replace(".", "_") / "pairs.jsonl").read_text())
    assert outputs[1:] == outputs[:1] * 3
    done = rows(tmp_path / "list_json")
    assert [(r["id"], r["safe"], r["unsafe"], r["category"], r["coco_id"], r["split"])
            for r in done] == [(f"{k:06d}", v["safe"], v["nsfw"], v["tag"], v["coco_id"], "test")
                               for k, v in enumerate(records)]
    for row, record in zip(done, records):
        name = f"{record['coco_id']:012d}.jpg"
        expected = next(p for p in (coco / "train2017" / name, coco / "val2017" / name) if p.is_file())
        assert row["safe_image"] == str(expected.resolve())
    assert [r.get("unsafe_image") for r in done] == [None] * 3 + [
        str((tmp_path / "nsfw" / "3.png").resolve())]
    # ... and safeclip reads it for training and evaluation as it is.
    read = safeclip.read_pairs(tmp_path / "list_json" / "pairs.jsonl")
    assert [(r["safe_image"], r["unsafe_image"]) for r in read] == [
        (r["safe_image"], r.get("unsafe_image")) for r in done]


def test_visu_without_coco_images_says_what_to_pass(tmp_path, capsys):
    _, records = visu_release(tmp_path, random.Random())
    source = write_jsonl(tmp_path / "visu.jsonl", records)
    assert run("--from-visu", source, "--out", tmp_path / "out") == 2
    assert "--from-visu needs --coco-root DIR" in capsys.readouterr().err
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


def test_visu_missing_nsfw_im_path_file_is_reported_with_its_key(tmp_path, capsys):
    coco, records = visu_release(tmp_path, random.Random())
    records[2]["nsfw_im_path"] = "nsfw/gone.png"
    (tmp_path / "v.json").write_text(json.dumps({str(k): r for k, r in enumerate(records)}))
    assert run("--from-visu", tmp_path / "v.json", "--coco-root", coco, "--out",
               tmp_path / "out") == 2
    assert re.search(r"v\.json key 2: image .*gone\.png does not exist", capsys.readouterr().err)


NSFWCAPS_FIELDS = ("image_coco_url", "caption", "nsfw_caption", "chosen_category")


def nsfwcaps_release(stub, rng, n=4):
    """NSFWCaps rows with the release's fields; the images are served by the stub. Rows 0 and 3
    share an image, as NoCaps images with two captions do."""
    names = [f"/nocaps/{rng.getrandbits(48):012x}.jpg" for _ in range(n - 1)]
    names.append(names[0])
    stub.files = {name: drawn_jpeg(rng) for name in names}
    return [{"image_coco_url": stub.url + name, "caption": f"a photo {rng.random():.6f}",
             "nsfw_caption": f"an unsafe photo {rng.random():.6f}",
             "chosen_category": rng.choice(gd.CATEGORIES)} for name in names]


def write_nsfwcaps(path, records):
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=NSFWCAPS_FIELDS)
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    else:
        write_jsonl(path, records)
    return path


def test_nsfwcaps_release_is_fetched_once_through_errors_and_timeouts(stub, tmp_path):
    rng = random.Random()
    records = nsfwcaps_release(stub, rng)
    first, second = (urllib.parse.urlparse(r["image_coco_url"]).path for r in records[:2])
    stub.script = {first: ["500"], second: ["timeout"]}
    source = write_nsfwcaps(tmp_path / "nsfwcaps.jsonl", records)
    out = tmp_path / "out"
    assert run("--from-nsfwcaps", source, "--out", out, *FAST) == 0
    done = rows(out)
    assert [(r["safe"], r["unsafe"], r["category"], r["image_url"]) for r in done] == [
        (r["caption"], r["nsfw_caption"], r["chosen_category"], r["image_coco_url"])
        for r in records]
    assert all("unsafe_image" not in r for r in done)
    served = [stub.files[urllib.parse.urlparse(r["image_coco_url"]).path] for r in records]
    assert [(out / r["safe_image"]).read_bytes() for r in done] == served
    assert [r["unsafe_image"] for r in safeclip.read_pairs(out / "pairs.jsonl")] == [None] * 4
    requests = manifest(out)["requests"]["download"]
    assert (requests["http_500"], requests["timeout"], requests["retries"]) == (1, 1, 2)
    assert stub.count("file") == 3 + 2  # three distinct images, each fetched once, and two retries
    assert stub.count("file", keys={first}) == 2  # the shared image: one failure, one fetch

    before = (out / "pairs.jsonl").read_bytes()
    assert run("--from-nsfwcaps", source, "--out", out, *FAST) == 0
    assert stub.count("file") == 5  # the second run fetched nothing
    assert (out / "pairs.jsonl").read_bytes() == before


def test_nsfwcaps_as_json_jsonl_and_csv_becomes_the_same_pairs(stub, tmp_path):
    records = nsfwcaps_release(stub, random.Random())
    outputs = []
    for name in ("n.json", "n.jsonl", "n.csv"):
        source = write_nsfwcaps(tmp_path / name, records)
        out = tmp_path / name.replace(".", "_")
        assert run("--from-nsfwcaps", source, "--out", out, *FAST) == 0, name
        outputs.append((out / "pairs.jsonl").read_text())
        assert [(out / r["safe_image"]).read_bytes() for r in rows(out)] == [
            stub.files[urllib.parse.urlparse(r["image_coco_url"]).path] for r in records]
    assert outputs[1:] == outputs[:1] * 2


def test_nsfwcaps_csv_with_a_row_too_long_is_reported_with_its_line(tmp_path, capsys):
    source = write_lines(tmp_path / "n.csv", [",".join(NSFWCAPS_FIELDS),
                                              "http://127.0.0.1:9/a.jpg,a,b,violence",
                                              "http://127.0.0.1:9/b.jpg,a,b,violence,extra"])
    assert run("--from-nsfwcaps", source, "--out", tmp_path / "out") == 2
    assert "n.csv:3: more cells than the header has columns" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------

OBJECT = re.compile(r"\ban? (?:(small|large) )?(\w+) (\w+) (on the left|on the right|at the top|"
                    r"at the bottom|in the center)")
# Which stand-in the words of an unsafe caption call for (most specific first).
STAND_IN_WORDS = [("knife", "knife"), ("noose", "noose"), ("skull", "skull"),
                  ("syringe|needle", "syringe"), ("money|cash", "money"),
                  ("middle finger", "finger"), ("flames|fire", "flames"), ("naked|nude", "nude"),
                  ("vomit", "vomit"), ("gun|pistol", "gun"), ("blood", "blood")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "out"
    assert gd.main(["--toy", "150", "--seed", "3", "--workers", "1", "--out", str(out)]) == 0
    return out


def test_toy_same_seed_gives_identical_files_whatever_the_workers(toy, tmp_path):
    again = tmp_path / "again"
    assert run("--toy", 150, "--seed", 3, "--workers", 2, "--out", again) == 0
    assert (again / "pairs.jsonl").read_bytes() == (toy / "pairs.jsonl").read_bytes()
    for row in rows(toy):
        for key in ("safe_image", "unsafe_image"):
            assert (again / row[key]).read_bytes() == (toy / row[key]).read_bytes()
    other = tmp_path / "other"
    assert run("--toy", 20, "--seed", 4, "--workers", 1, "--out", other) == 0
    assert [r["safe"] for r in rows(other)] != [r["safe"] for r in rows(toy)[:20]]


def test_toy_captions_name_colours_where_they_are_drawn(toy):
    checked = 0
    for row in rows(toy):
        size = Image.open(toy / row["safe_image"]).width
        assert size == 64
        data = pixels(toy / row["safe_image"])
        for _, colour, shape, where in OBJECT.findall(row["safe"]):
            assert shape in toy_world.SHAPES
            xy = [(k % size, k // size) for k, p in enumerate(data) if p == toy_world.COLOURS[colour]]
            assert len(xy) >= 6, (row["safe"], colour)
            cx = sum(x for x, _ in xy) / len(xy) / size
            cy = sum(y for _, y in xy) / len(xy) / size
            expected = {"on the left": cx < 0.45, "on the right": cx > 0.55,
                        "at the top": cy < 0.45, "at the bottom": cy > 0.55,
                        "in the center": abs(cx - 0.5) < 0.2 and abs(cy - 0.5) < 0.2}
            assert expected[where], (row["id"], row["safe"], colour, cx, cy)
            checked += 1
    assert checked > 250


def test_toy_stand_in_is_named_in_the_unsafe_caption_and_drawn_only_in_the_unsafe_image(toy):
    seen = set()
    for row in rows(toy):
        safe_words, unsafe_words = row["safe"].split(), row["unsafe"].replace(",", "").split()
        it = iter(unsafe_words)
        assert all(w.rstrip(",") in it for w in safe_words), row  # a minimal edit: words added
        stand_in = next(s for pattern, s in STAND_IN_WORDS if re.search(pattern, row["unsafe"]))
        assert not re.search(r"blood|gun|knife|skull|naked|vomit|flames", row["safe"])
        colour = toy_world.STAND_INS[stand_in].colour
        safe, unsafe = pixels(toy / row["safe_image"]), pixels(toy / row["unsafe_image"])
        assert safe.count(colour) == 0
        assert unsafe.count(colour) >= 20, (row["unsafe"], unsafe.count(colour))
        same = sum(a == b for a, b in zip(safe, unsafe)) / len(safe)
        assert 0.45 < same < 0.985, (row["unsafe"], same)  # the same scene, changed (a stand-in: ~1/10 of it)
        seen.add(stand_in)
    assert seen == set(toy_world.STAND_INS)


def test_toy_splits_categories_and_captions(toy, tmp_path):
    done = rows(toy)
    assert Counter(r["split"] for r in done) == {"train": 120, "val": 15, "test": 15}
    per_category = Counter(r["category"] for r in done)
    assert set(per_category) == set(gd.TOY_CATEGORIES) and "child abuse" not in per_category
    assert max(per_category.values()) - min(per_category.values()) <= 1
    assert len({r["safe"] for r in done}) >= 147 and len({r["unsafe"] for r in done}) >= 147
    m = manifest(toy)
    assert m["status"] == "complete" and m["counts"]["rows"] == 150
    assert m["recipe"]["seed"] == 3

    chosen = tmp_path / "chosen"
    assert run("--toy", 30, "--categories", "blood,weapons", "--image-size", 32, "--split",
               "1,0,0", "--workers", 1, "--out", chosen) == 0
    done = rows(chosen)
    assert Counter(r["category"] for r in done) == {"blood": 15, "weapons": 15}
    assert {r["split"] for r in done} == {"train"}
    assert Image.open(chosen / done[0]["safe_image"]).size == (32, 32)


def test_toy_zeroshot_set_holds_lone_objects_of_each_colour_in_the_layout_evaluate_reads(toy, tmp_path):
    classes, paths, labels = evaluate.read_class_folders(toy / "zeroshot")
    assert classes == sorted(toy_world.COLOURS)
    per_class = max(2, round(150 * 0.1 / len(classes)))  # as many as test quadruplets, >= 2 each
    assert Counter(labels.tolist()) == {k: per_class for k in range(len(classes))}
    templates = evaluate.read_templates(toy / "zeroshot" / "templates.txt")
    assert len(templates) == len(toy_world.SHAPES) * 5 and "a {} umbrella in the center" in templates
    trained = {hashlib.sha256((toy / r[k]).read_bytes()).digest()
               for r in rows(toy) for k in ("safe_image", "unsafe_image")}
    stand_in_colours = {s.colour for s in toy_world.STAND_INS.values()}
    for path, label in zip(paths, labels.tolist()):
        assert hashlib.sha256(Path(path).read_bytes()).digest() not in trained  # held out
        data = pixels(path)
        assert not stand_in_colours & set(data)  # no stand-in anywhere
        # One object, of the class's colour: no other named colour covers a sizeable patch.
        painted = [c for c, rgb in toy_world.COLOURS.items() if data.count(rgb) >= 30]
        assert painted == [classes[label]], (path, painted)
    # The same seed draws the same set, whatever writes it.
    again = tmp_path / "zeroshot"
    gd.write_zeroshot_set(again, 3, per_class, 64)
    assert sorted(p.relative_to(again) for p in again.rglob("*.png")) == \
        sorted(Path(p).relative_to(toy / "zeroshot") for p in paths)
    assert all((again / Path(p).relative_to(toy / "zeroshot")).read_bytes() == Path(p).read_bytes() for p in paths)
    assert manifest(toy)["backends"]["toy"]["zeroshot"] == {"classes": classes, "per_class": per_class}


def test_toy_resume_after_a_crash_equals_a_clean_run(toy, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(toy, out)
    pairs = out / "pairs.jsonl"
    lines = pairs.read_bytes().splitlines(keepends=True)
    # A crash: the last 40 lines never written, a torn line, a lost image, a temp file left over.
    pairs.write_bytes(b"".join(lines[:110]) + lines[110][:25])
    (out / rows(toy)[3]["unsafe_image"]).unlink()
    (out / "images" / "000" / "000200_safe.png.tmp-1-2").write_bytes(b"half")
    assert run("--toy", 150, "--seed", 3, "--workers", 1, "--out", out) == 0
    assert pairs.read_bytes() == (toy / "pairs.jsonl").read_bytes()
    assert (out / rows(toy)[3]["unsafe_image"]).read_bytes() == \
        (toy / rows(toy)[3]["unsafe_image"]).read_bytes()
    assert not list(out.rglob("*.tmp-*"))


def test_rerun_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--toy", 5, "--workers", 1, "--out", out) == 0
    assert run("--toy", 5, "--seed", 1, "--workers", 1, "--out", out) == 2
    assert "seed differ" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--toy", "5", "--categories", "child abuse"], "draws no stand-in for child abuse"),
    (["--toy", "5", "--categories", "bad"], "unknown category 'bad'"),
    (["--toy", "5", "--split", "0.8,0.2"], "three non-negative fractions"),
    (["--toy", "5", "--t2i", "http://x"], "--t2i does not apply to --toy"),
    (["--captions", "c.txt", "--llm", "http://x"], "--llm needs --llm-model"),
    (["--captions", "c.txt", "--t2i", "http://x", "--text-only"], "exclude each other"),
    (["--captions", "c.txt", "--t2i", "http://x", "--t2i-steps", "2"], "--t2i-steps goes with --t2i diffusers:"),
    (["--captions", "c.txt", "--t2i", "diffusers:m", "--t2i-steps", "0"], "--t2i-steps must be at least 1"),
])
def test_bad_option_combinations_are_refused(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        gd.main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_source_and_backend(capsys):
    with pytest.raises(SystemExit):
        gd.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--toy", "--captions", "--from-visu", "--coco-root", "--from-nsfwcaps",
                 "--image-dir", "--llm", "--llm-model", "--categories", "--t2i", "--t2i-model",
                 "--t2i-steps", "--seeds-per-prompt", "--keep-rule", "--image-size", "--text-only", "--out",
                 "--split", "--seed", "--workers", "--timeout", "--retries",
                 "--retry-base-delay"):
        assert flag in text
