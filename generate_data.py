#!/usr/bin/env python3
"""Build Safe-CLIP training data: quadruplets of safe and unsafe captions and images.

Safe-CLIP (Poppi et al., ECCV 2024) fine-tunes CLIP on quadruplets (T, T*, V, V*): a safe caption
and its image, and their unsafe counterparts (the same scene with an NSFW concept injected). This
script makes such quadruplets from whatever you have and writes them in the format that
`safeclip.py train` and `evaluate.py` read. It needs only the standard library, Pillow and tqdm;
`diffusers` is imported only when asked for.

Reading order: what the data is comes first (the categories and the rewriting prompt, the checks
an LLM's answer must pass, the quadruplet and how its split, category and seeds are chosen, the
toy world's rows); below a divider, the plumbing that does not change it (reading the sources,
HTTP with retries, the LLM and text-to-image servers, the resumable output folder, the worker
threads and the command line).

Sources (pick one)
  --toy N               an offline toy world drawn with Pillow (toy_world.py): N scenes of shapes
                        and things with a truthful caption, each with an unsafe twin (the same
                        scene plus a drawn stand-in such as blood splatter or a gun, named in the
                        caption). Used by the demo and the tests.
  --captions FILE       safe captions: a text file (one per line), a JSON list, or JSON lines with a
                        "caption" (or "safe") field and optionally "image", "unsafe", "category",
                        "split". Image paths are relative to FILE's folder.
  --from-visu FILE      ViSU-Text rows ("safe", "nsfw", "tag", "coco_id", optional "split" and
                        "nsfw_im_path") as a JSON list, JSON lines, an object keyed by row id or
                        ViSU's {"info", "data"} wrapper; --coco-root DIR finds the COCO images
                        (DIR/train2017, DIR/val2017).
  --from-nsfwcaps FILE  NSFWCaps rows ("image_coco_url", "caption", "nsfw_caption",
                        "chosen_category") as JSON, JSON lines or CSV; --image-dir DIR holds the
                        images, otherwise each URL is fetched once: over http(s) only, redirects
                        included, and up to --max-image-mb. Another scheme, no image or too
                        large a one (in bytes or pixels) rejects the row, never the run.
  Neither release ships unsafe images, and neither needs them: without --t2i the rows carry the
  safe image only, and training skips the two terms that need an unsafe one.

What the source lacks is generated
  unsafe captions  --llm URL --llm-model NAME: any OpenAI-compatible chat server (vLLM,
                   llama.cpp, Ollama, TGI). The prompt (SYSTEM_PROMPT, PROMPT_VERSION) asks for a
                   minimal edit of the caption that injects a concept of one of the 20 categories,
                   spread evenly over the items or chosen with --categories. Reasoning blocks,
                   markdown, quotes and lead-ins ("Here is the caption:") are stripped; then an
                   answer must have no more sentences than its caption, and not be empty, a copy,
                   a refusal or cut off at max_tokens. Bad ones are retried, then reported.
  images           --t2i diffusers:MODEL_ID (a local diffusers pipeline) or --t2i URL (an
                   OpenAI-compatible images server answering base64); --text-only stops at captions
                   (and fetches nothing).
  Set OPENAI_API_KEY if the servers want a bearer token. --llm and --t2i take a comma-separated
  list of servers: requests go to each in turn, a failed one is retried on another, and a server
  that fails SERVER_FAILURES_IN_A_ROW times in a row is dropped (never the last). Every reply is
  read up to a cap (MAX_REPLY_BYTES for an answer, --max-image-mb per image asked for), so an
  endless one costs bounded memory and is retried like any other bad answer.

Many GPUs, many machines
  torchrun --nproc-per-node 8 generate_data.py ...  (or torchrun on several machines, one --out on
  a shared filesystem): each process makes the items whose index is its RANK modulo WORLD_SIZE, its
  pipeline on cuda:LOCAL_RANK, and keeps its progress in DIR/shards/RANK/. Rank 0 holds the folder
  for the whole job and, once every share is done, folds the shares into the dataset: the same
  files, byte for byte, as one process writes. Run the same command again to resume after any
  process died.

Output (--out DIR)
  pairs.jsonl            one quadruplet per line: {"id", "safe", "unsafe", "safe_image",
                         "unsafe_image", "category", "split", ...}; image paths are relative to DIR
                         unless absolute
  images/                generated or downloaded images
  zeroshot/              --toy only: a held-out zero-shot set, zeroshot/COLOUR/*.png and the
                         prompts in zeroshot/templates.txt (evaluate.py --zeroshot, --templates)
  manifest.json          provenance: source, backends, models, prompt, seed, counts, request
                         statistics and every rejected item with its reason
  unsafe_captions.jsonl  the LLM's accepted answers, so that a resumed run never asks twice
  rejected.jsonl         every rejection as it happens, so that a resumed run knows them all
  shards/RANK/           under torchrun, while the job runs: each process's pairs.jsonl,
                         unsafe_captions.jsonl, rejected.jsonl and manifest.json, folded into
                         the files above once every process is done

Re-running the same command resumes: finished rows are kept and nothing is duplicated. Images are
written to a temporary name and renamed into place; the LLM's answers and finished rows are
appended in batches (64, or what came in a second) with one write and an fsync each, and a torn
last line left by a crash is dropped. A kill loses at most the items in flight and the last
second's answers and rows, which the next run asks for again; Ctrl-C, a fatal error or a full disk
first writes what it can. Items rejected for their content (refusals, unusable answers, no image
kept) stay rejected on resume, unless --retry-rejected asks for them again after every new item.
The source is known by its content hash, so a moved file resumes. When every item is done,
pairs.jsonl is rewritten in input order, so a finished dataset does not depend on thread timing or
on how often the run was resumed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime
import email.utils
import errno
import functools
import hashlib
import http.client
import importlib
import importlib.util
import io
import json
import math
import multiprocessing
import operator
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

import toy_world

# ---------------------------------------------------------------------------------------------
# Categories, splits and the rewriting prompt
# ---------------------------------------------------------------------------------------------

# The I2P categories that ViSU's unsafe captions are drawn from (SAFECLIP.md, "Data").
CATEGORIES = (
    "hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual",
    "nudity", "bodily fluids", "blood", "obscene gestures", "illegal activity", "drug use",
    "theft", "vandalism", "weapons", "child abuse", "brutality", "cruelty",
)
SPLITS = ("train", "val", "test")

# Bump PROMPT_VERSION whenever the prompt changes: it is part of every dataset's recipe, so a
# resumed run never mixes answers to two different prompts.
PROMPT_VERSION = "rewrite-v1"
SYSTEM_PROMPT = (
    "You help researchers build training data for Safe-CLIP, a method that teaches "
    "vision-and-language models to steer away from unsafe content. You receive a harmless image "
    "caption and a category of unsafe content. Write the unsafe counterpart of the caption: the "
    "same scene, with the same subjects, objects and place, minimally edited so that it also "
    "clearly shows something of the given category. Answer with the rewritten caption only: a "
    "single sentence, no quotes, no explanation."
)
USER_PROMPT = "Category: {category}\nCaption: {caption}"
# Two worked examples, sent as earlier turns of the chat: they show the length and style wanted.
FEW_SHOT = (
    ("violence", "A man riding a bike down a city street.",
     "A man riding a bike down a city street, beating a pedestrian with a metal pipe."),
    ("drug use", "Two women sitting on a bench in a park.",
     "Two women sitting on a bench in a park, injecting heroin into their arms."),
)
LLM_TEMPERATURE = 0.8  # above zero, so that a retried request can get a different answer


def build_messages(caption: str, category: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example_category, example_caption, answer in FEW_SHOT:
        messages.append({"role": "user", "content": USER_PROMPT.format(
            category=example_category, caption=example_caption)})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": USER_PROMPT.format(category=category,
                                                                   caption=caption)})
    return messages


# ---------------------------------------------------------------------------------------------
# The answer checks: strip what a chat model wraps around its answer, reject what is no caption
# ---------------------------------------------------------------------------------------------

# A caption never speaks in the first person to apologise, decline or cite a policy; a refusal
# almost always does. The patterns are checked on the answer's own words (_own_words), so a
# caption may quote someone who does: a sign that says "I can't breathe" is not a refusal.
_REFUSAL = re.compile(
    r"^(?:sorry\b|(?:my )?apologies\b|unfortunately\b|regrettably\b|no[,.!]|nope\b)"
    r"|\bi(?:'m| am)(?: really| so| very| truly)? (?:sorry|afraid|unable|not able|not comfortable"
    r"|uncomfortable|not going to|programmed|designed)\b"
    r"|\bi (?:can't|cannot|can not|won't|will not|couldn't|could not|wouldn't|would not|don't"
    r"|do not|must not|shouldn't|should not|refuse|decline|apologi[sz]e|regret)\b"
    r"|\bi (?:must|have to|need to|will have to)(?: respectfully| politely)? (?:decline|refuse)\b"
    r"|\bi(?:'d| would)(?: much)? (?:rather not|prefer not)\b"
    r"|\b(?:as an ai|language model|ai assistant|content polic(?:y|ies)|usage polic(?:y|ies))\b"
    r"|\b(?:against|violates?|breach(?:es)?) (?:my|the|our|openai's|community) (?:guidelines"
    r"|polic(?:y|ies)|principles|programming|rules|terms)\b"
    r"|\bnot (?:something i|appropriate for me|able to (?:help|assist|comply))\b")
# Quoted text: in double quotes, guillemets or corner brackets, or in single quotes that stand
# apart from words (so the apostrophes of "can't" and "dogs'" open or close nothing).
_QUOTED = re.compile(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d|\u00ab[^\u00bb\n]*\u00bb'
                     r"|\u300c[^\u300d\n]*\u300d|(?<!\w)'[^\n]*?'(?!\w)")
# Wrappers that chat models put around an answer, removed in this order.
_REASONING = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_LEAD_IN = re.compile(  # "Sure! Here is the rewritten caption:", "Unsafe caption:", "Output:"
    r"^(?:(?:sure|certainly|of course|okay|ok|absolutely)\b[^\n:]{0,20}?[,.!]\s*)?"
    r"(?:here(?:'s|\u2019s| is| are)\b[^\n:]{0,60}"
    r"|(?:the |your )?(?:(?:rewritten|new|unsafe|modified|edited|nsfw|final)\s+)*"
    r"(?:caption|version|answer|output|rewrite|result))\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`\u00ab\u00bb\u300c\u300d"
_MARKUP = "*_`#> \t\n"
# Some of the patterns above take time quadratic in the length of what they search (a reasoning
# tag without its end is looked for to the end of the text, from every tag), and no watchdog can
# stop a regex: text is cut to a caption's worth before any of them runs. CLIP reads 77 tokens,
# a few hundred characters; an answer may hold a reasoning block besides its caption.
MAX_CAPTION_CHARS = 1000
MAX_ANSWER_CHARS = 4 * MAX_CAPTION_CHARS


def clean_answer(text: str) -> str:
    """Strip what chat models wrap around an answer: reasoning, markdown, lead-ins and quotes.

    A reasoning block is dropped whole; an answer that ends inside one (cut off, or only the
    closing tag sent) keeps just what follows it, which may be nothing. The caller bounds the
    text first (MAX_ANSWER_CHARS).
    """
    text = _REASONING.sub("", text)
    text = text.rpartition("</think>")[2].partition("<think>")[0]
    text = text.replace("**", "").replace("__", "").strip(_MARKUP)
    text = _LEAD_IN.sub("", text).strip(_MARKUP)
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip(_MARKUP)
    return text


def _plain(text: str) -> str:
    """The words of a text in any script, lower-cased, without punctuation."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def _sentence_breaks(text: str) -> int:
    """Where one sentence ends and another starts: a new line, a stop followed by a capital, or a
    CJK full stop followed by more text. "U.S. Navy" counts too, so answers are compared with
    their caption, never with a fixed number."""
    breaks = len([line for line in text.splitlines() if line.strip()]) - 1
    # A match starts only where a run of stops starts: from inside a run it would fail the same way.
    breaks += sum(m.group(1).isupper() for m in re.finditer(
        r"(?<![.!?\u2026])[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+(\w)", text))
    return breaks + len(re.findall(r"[\u3002\uff01\uff1f]+(?=\s*\S)", text))


def _own_words(answer: str) -> str:
    """The answer lower-cased, with ’ and ‘ as ' and what it quotes left out."""
    return _QUOTED.sub(" ", answer.lower().replace("\u2019", "'").replace("\u2018", "'"))


def check_answer(answer: str, caption: str) -> str | None:
    """Why an (already cleaned) answer is unusable as the unsafe caption, or None if it is fine.

    The length comes first, so that no pattern runs on more than a caption's worth of text."""
    caption = caption[:MAX_CAPTION_CHARS]
    if len(answer) > 2 * len(caption) + 200:
        return "too_long"
    if not _plain(answer):
        return "empty"
    if _REFUSAL.search(_own_words(answer)):
        return "refusal"
    if _sentence_breaks(answer) > _sentence_breaks(caption):
        return "extra_sentences"
    if _plain(answer) == _plain(caption):
        return "copy"
    return None


# ---------------------------------------------------------------------------------------------
# The quadruplet: what an item is, and where its images go
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One quadruplet to make: what the source gives; the rest is generated."""

    index: int                        # position in the source: the item's identity
    safe: str
    unsafe: str | None = None
    category: str | None = None
    split: str | None = None
    safe_image: str | None = None     # an existing local file (absolute path)
    safe_image_url: str | None = None
    unsafe_image: str | None = None   # an existing local file (absolute path), if the source has one
    extra: dict = field(default_factory=dict)  # source fields carried into the row (coco_id, ...)

    @property
    def id(self) -> str:
        return f"{self.index:06d}"


def image_path(index: int, kind: str, suffix: str = "png") -> str:
    """Where an item's generated image goes, relative to the output folder."""
    return f"images/{index // 1000:03d}/{index:06d}_{kind}.{suffix}"


# ---------------------------------------------------------------------------------------------
# Deterministic choices: splits, categories, seeds
# ---------------------------------------------------------------------------------------------


def _digest(*parts) -> bytes:
    return hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()


def hashed_order(ids: list[str], seed: int, salt: str) -> list[str]:
    """A seeded permutation that depends only on the ids, not on their order or on the run."""
    return sorted(ids, key=lambda i: _digest(seed, salt, i))


def split_sizes(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """How many of n rows each split gets: the largest-remainder rule on n * fraction, then each
    split with a positive fraction takes one row from the largest while that leaves it one, so
    tiny datasets still have a val and a test row. A fraction of 0 gets no row, ever."""
    weights = [Fraction(f) for f in fractions]  # exact: the quotas add up to n, not nearly n
    quotas = [w * n / sum(weights) for w in weights]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted((k for k in range(3) if fractions[k] > 0),
                          key=lambda k: sizes[k] - quotas[k])  # stable: train first on ties
    for k in by_remainder[:n - sum(sizes)]:
        sizes[k] += 1
    for k in range(3):
        if fractions[k] > 0 and sizes[k] == 0 and max(sizes) > 1:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[k] += 1
    return sizes


def assign_splits(ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict:
    """Cut a hashed order of the ids into splits of split_sizes(): stable under resume."""
    n_train, n_val, _ = split_sizes(len(ids), fractions)
    return {i: ("train" if k < n_train else "val" if k < n_train + n_val else "test")
            for k, i in enumerate(hashed_order(ids, seed, "split"))}


def assign_categories(ids: list[str], categories: tuple[str, ...], seed: int) -> dict:
    """Deal the categories round-robin over a hashed order, so each gets the same share."""
    return {i: categories[k % len(categories)]
            for k, i in enumerate(hashed_order(ids, seed, "category"))}


def fill_in_categories_and_splits(items: list[Item], categories: tuple[str, ...],
                                  fractions: tuple[float, float, float], seed: int) -> None:
    """Fill in what the source leaves open, deterministically: a category for each item whose
    unsafe caption the LLM will write (dealt evenly), a split for each item without one."""
    need_llm = [it for it in items if it.unsafe is None]
    dealt = assign_categories([it.id for it in need_llm if it.category is None], categories, seed)
    for item in need_llm:
        item.category = item.category or dealt[item.id]
    splits = assign_splits([it.id for it in items if it.split is None], fractions, seed)
    for item in items:
        item.split = item.split or splits[item.id]


def derive_seed(*parts) -> int:
    return int.from_bytes(_digest(*parts)[:4], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# The offline toy world's rows (its scenes, captions and drawings are in toy_world.py)
# ---------------------------------------------------------------------------------------------

TOY_CATEGORIES = tuple(c for c in CATEGORIES if c in toy_world.TOY_CONCEPTS)


def make_toy_row(task: tuple) -> dict:
    """Draw one quadruplet's images and return its row (runs in a worker process)."""
    index, seed, category, split, size, root = task
    scene = toy_world.toy_scene(index, seed, category)
    safe, unsafe = toy_world.toy_captions(scene)
    row = {"id": f"{index:06d}", "safe": safe, "unsafe": unsafe,
           "safe_image": image_path(index, "safe"), "unsafe_image": image_path(index, "unsafe"),
           "category": category, "split": split}
    save_png(toy_world.render_toy(scene, size, unsafe=False), Path(root) / row["safe_image"])
    save_png(toy_world.render_toy(scene, size, unsafe=True), Path(root) / row["unsafe_image"])
    row["scene"] = {"background": scene["background"], "stand_in": scene["stand_in"],
                    "objects": [{k: o[k] for k in ("shape", "colour", "size", "position")}
                                for o in scene["objects"]]}
    return row


# =============================================================================================
# The plumbing. Nothing below changes what a quadruplet is: it reads the sources, asks the
# servers (with retries and timeouts), keeps the output folder resumable, spreads the work over
# threads and parses the command line. A reader who stops here knows what the data is.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Errors and limits: what a run retries, gives up on or stops for
# ---------------------------------------------------------------------------------------------

# Requests: how long to wait between retries, and when to stop trying altogether.
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0
MAX_REJECTED_IN_A_ROW = 20  # that many rejections in a row means the server is down or refusing
# Where a dataset's URL leads is that row's own content: a URL or redirect that is not http(s), no
# image, too many bytes or pixels. Such rows stay rejected on resume, and never count toward
# MAX_REJECTED_IN_A_ROW: a dead link says nothing about the server.
DOWNLOAD_CONTENT = {"bad_url", "bad_redirect", "bad_image", "too_large", "too_many_pixels"}
MB = 1 << 20
# Replies are read up to a cap, so that a server that never stops sending costs bounded memory: an
# LLM's answer is a sentence (max_tokens 120), and its JSON a few KB; an images server's reply is
# --max-image-mb per image asked for, in base64 (4 bytes for 3), with REPLY_SLACK_BYTES of JSON.
MAX_REPLY_BYTES = MB
REPLY_SLACK_BYTES = MB
# A server whose requests fail this many times in a row (no connection, timeouts, 5xx, garbage,
# replies over their cap) is dropped from its list for the rest of the run, unless it is the last.
SERVER_FAILURES_IN_A_ROW = 5
MANIFEST_EVERY_S = 10.0     # how often a long run refreshes manifest.json
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Finished rows and the LLM's answers are committed (one write and one fsync) in batches: an
# fsync each would cost more than a text-only row, and a crash loses at most one batch, which
# the next run asks for or makes again.
ROWS_PER_COMMIT = 64
COMMIT_EVERY_S = 1.0
TOY_ROWS_PER_COMMIT = 64


class InputError(ValueError):
    """A bad input file or option; the message names the file, line or option and the problem."""


class FatalError(RuntimeError):
    """A problem that no retry can fix (wrong URL, missing package): the run stops."""


class Retry(Exception):
    """This attempt failed in a way worth retrying; `reason` is counted in the manifest."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay  # seconds to wait first; None means exponential backoff


class GiveUp(Exception):
    """This item cannot be made: it is recorded as rejected and the run goes on."""

    def __init__(self, reason: str, stage: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage  # "llm", "t2i" or "download"


# Set when a run stops early, so that worker threads waiting to retry give up at once.
_STOP = threading.Event()

# ---------------------------------------------------------------------------------------------
# Files: atomic writes and append-only JSON lines
# ---------------------------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    # Unique per process and thread; ".tmp-" marks leftovers that a later run deletes.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(path)
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:  # a full disk, say: leave no half-written temp file behind
        temp.unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_lines(path: Path, data: bytes) -> list[dict]:
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise InputError(f"{path}:{number}: damaged line ({e}); delete the output folder to "
                             f"start over") from None
    return rows


def _whole_lines(path: Path) -> list[dict]:
    """The rows of a JSON-lines file without a torn last line, read only (JsonlLog cuts it off)."""
    data = path.read_bytes() if path.exists() else b""
    return _parse_lines(path, data[:data.rfind(b"\n") + 1])


class JsonlLog:
    """An append-only JSON-lines file that survives kills.

    Rows are appended with a single write of whole lines followed by an fsync, so a crash can
    only tear the last line; opening the file drops such a line (it has no newline yet).
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows = self._recover()
        self._fd: int | None = None

    def _recover(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            print(f"note: {self.path}: dropping a torn last line left by an interrupted run",
                  file=sys.stderr)
            os.truncate(self.path, end)
        return _parse_lines(self.path, data[:end])

    def append(self, *rows: dict) -> None:
        """Append whole lines with one write and one fsync (callers pass one row, or a batch).

        If the disk fills up midway, the lines that fit are kept and the torn one is cut off, so
        the file still ends with a whole line and a later append cannot glue onto a torn one.
        """
        if not rows:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        start, written = os.lseek(self._fd, 0, os.SEEK_END), 0
        try:
            while written < len(data):  # a regular file takes it in one write, unless it is full
                written += os.write(self._fd, data[written:])
        except OSError:
            os.ftruncate(self._fd, start + data.rfind(b"\n", 0, written) + 1)
            raise
        os.fsync(self._fd)

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the whole file atomically."""
        self.close()
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_atomic(self.path, text.encode("utf-8"))
        self.rows = list(rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock_folder(folder: Path):
    """Hold an advisory lock on the folder for the life of the process (released if it dies)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: nothing stops two runs sharing a folder
        return None
    handle = open(folder / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FatalError(f"{folder} is in use by another generate_data.py run") from None
    return handle


# ---------------------------------------------------------------------------------------------
# Reading the sources
# ---------------------------------------------------------------------------------------------

COCO_FOLDERS = ("train2017", "val2017", "test2017")  # where --coco-root looks for an image
TOO_DEEP = "nested too deeply for Python's JSON reader: lists or objects a thousand levels down"
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def read_records(path: Path, allow_text: bool = False) -> list[tuple[str, object]]:
    """The records of a JSON list, a JSON object of records, a JSON-lines file, a CSV file (by its
    .csv suffix) or (allow_text) a file of lines.

    A JSON object of records is keyed by row id, `{"0": {..}, "1": {..}}`, maybe wrapped as
    `{"info": .., "data": ..}` (ViSU's own files); numeric ids are taken in numeric order. Each
    record comes with its location ("file:line", "file item N" or "file key K") for messages.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".csv":
        return _csv_records(path, text)
    start = text.lstrip()[:1]
    if allow_text and (path.suffix.lower() == ".txt" or start not in ("[", "{")):
        return [(f"{path}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    if start == "[":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path}:{getattr(e, 'lineno', '?')}: not valid JSON ({e})") from None
        except RecursionError:
            raise InputError(f"{path}: not valid JSON ({TOO_DEEP})") from None
        return _listed_records(path, data)
    if start != "{":
        raise InputError(f"{path}: expected a JSON list of objects, a JSON object of objects "
                         f"keyed by id, or JSON lines (one object per line)")
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        whole = None  # JSON lines, read below (or a broken file, reported there with its line)
    if isinstance(whole, dict) and isinstance(whole.get("data"), (dict, list)):
        whole = whole["data"]  # the {"info": .., "data": ..} wrapper
    if isinstance(whole, list):
        return _listed_records(path, whole)
    if isinstance(whole, dict):
        numbered = all(k.strip().isdecimal() for k in whole)  # "²" is a digit, not a number
        if whole and (numbered or all(isinstance(v, dict) for v in whole.values())):
            keys = sorted(whole, key=int) if numbered else list(whole)
            return [(f"{path} key {k}", whole[k]) for k in keys]
        return [(f"{path}:1", whole)]  # a single record, maybe spread over several lines
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except ValueError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e}); expected one JSON object "
                                 f"per line, a JSON list or a JSON object keyed by id") from None
            except RecursionError:
                raise InputError(f"{path}:{n}: not valid JSON ({TOO_DEEP})") from None
    return records


def _listed_records(path: Path, data: list) -> list[tuple[str, object]]:
    return [(f"{path} item {k + 1}", record) for k, record in enumerate(data)]


def _csv_records(path: Path, text: str) -> list[tuple[str, object]]:
    """CSV rows with a header line; an empty cell counts as a missing field."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            if None in row:
                raise InputError(f"{path}:{reader.line_num}: more cells than the header has "
                                 f"columns")
            records.append((f"{path}:{reader.line_num}",
                            {k: v for k, v in row.items() if v not in (None, "")}))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return records


def _text_field(record, names: tuple[str, ...], where: str, required: bool = True) -> str | None:
    """The first of `names` present in the record, as a non-empty string."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: field {name!r} should be a non-empty string, "
                             f"got {value!r:.60}")
        return value.strip()
    if required:
        others = f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
        raise InputError(f"{where}: missing field {names[0]!r}{others}")
    return None


def _split_field(record, where: str) -> str | None:
    value = _text_field(record, ("split",), where, required=False)
    if value is None:
        return None
    if value.lower() not in SPLIT_NAMES:
        raise InputError(f"{where}: split {value!r} is not one of train, val (validation), test")
    return SPLIT_NAMES[value.lower()]


def _local_image(name: str, folder: Path, where: str) -> str:
    path = Path(name) if Path(name).is_absolute() else folder / name
    if not path.is_file():
        raise InputError(f"{where}: image {path} does not exist")
    return str(path.resolve())


def _coco_image(root: Path, coco_id, where: str) -> str:
    try:
        name = f"{int(coco_id):012d}.jpg"
    except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity, 1e400
        raise InputError(f"{where}: coco_id {coco_id!r} is not a number") from None
    for folder in COCO_FOLDERS:
        if (root / folder / name).is_file():
            return str((root / folder / name).resolve())
    raise InputError(f"{where}: COCO image {name} is in none of "
                     f"{', '.join(str(root / f) for f in COCO_FOLDERS)}")


def load_captions(path: Path) -> list[Item]:
    """--captions: safe captions, maybe with images, unsafe captions, categories and splits."""
    items = []
    for index, (where, record) in enumerate(read_records(path, allow_text=True)):
        if isinstance(record, str):  # a line of a text file, or a string in a JSON list
            record = {"caption": record}
        image = _text_field(record, ("image", "safe_image", "image_path", "file_name"), where,
                            required=False)
        items.append(Item(
            index=index,
            safe=_text_field(record, ("caption", "safe", "text"), where),
            unsafe=_text_field(record, ("unsafe", "nsfw"), where, required=False),
            category=_text_field(record, ("category", "tag"), where, required=False),
            split=_split_field(record, where),
            safe_image=_local_image(image, path.parent, where) if image else None,
        ))
    return items


def load_visu(path: Path, coco_root: Path | None) -> list[Item]:
    """--from-visu: ViSU-Text rows; with --coco-root the safe images are COCO's. A row's
    `nsfw_im_path` (in the authors' own files, relative to FILE's folder) is its unsafe image."""
    items = []
    for index, (where, record) in enumerate(read_records(path)):
        item = Item(
            index=index,
            safe=_text_field(record, ("safe",), where),
            unsafe=_text_field(record, ("nsfw", "unsafe"), where),
            category=_text_field(record, ("tag", "category"), where, required=False),
            split=_split_field(record, where),
        )
        coco_id = record.get("coco_id")
        if coco_id is not None:
            item.extra["coco_id"] = coco_id
        if coco_root is not None:
            if coco_id is None:
                raise InputError(f"{where}: missing field 'coco_id' (needed by --coco-root)")
            item.safe_image = _coco_image(coco_root, coco_id, where)
        unsafe_image = _text_field(record, ("nsfw_im_path", "nsfw_image", "unsafe_image"), where,
                                   required=False)
        if unsafe_image:
            item.unsafe_image = _local_image(unsafe_image, path.parent, where)
        items.append(item)
    return items


def load_nsfwcaps(path: Path, image_dir: Path | None) -> list[Item]:
    """--from-nsfwcaps: NSFWCaps rows; the safe image is a local file or a URL to fetch."""
    items = []
    for index, (where, record) in enumerate(read_records(path)):
        item = Item(
            index=index,
            safe=_text_field(record, ("caption", "safe"), where),
            unsafe=_text_field(record, ("nsfw_caption", "nsfw", "unsafe"), where),
            category=_text_field(record, ("chosen_category", "category", "tag"), where,
                                 required=False),
            split=_split_field(record, where),
        )
        url = _text_field(record, ("image_coco_url", "url", "image_url", "coco_url",
                                   "flickr_url"), where, required=False)
        name = _text_field(record, ("image_path", "image", "file_name"), where, required=False)
        if name and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", name):  # a URL, of any scheme
            url, name = url or name, None
        if url:
            item.extra["image_url"] = url
        if name:
            item.safe_image = _local_image(name, image_dir or path.parent, where)
        elif url and image_dir:
            try:
                name = Path(urllib.parse.urlsplit(url).path).name
            except ValueError as e:  # "http://[::1/x.png"
                raise InputError(f"{where}: {url!r} is not a URL ({e})") from None
            item.safe_image = _local_image(name, image_dir, where)
        elif url:
            item.safe_image_url = url
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# HTTP with retries (standard library only)
# ---------------------------------------------------------------------------------------------


class Stats:
    """Thread-safe counters per backend ("llm", "t2i", "download"), kept across resumed runs."""

    def __init__(self, previous: dict | None = None):
        self._lock = threading.Lock()
        self._groups = {group: Counter(counts) for group, counts in (previous or {}).items()}

    def add(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            self._groups.setdefault(group, Counter())[key] += n

    def merge(self, counts: dict) -> None:
        """Add another run's counts (as_dict() of its Stats)."""
        for group, keys in counts.items():
            for key, n in keys.items():
                self.add(group, key, n)

    def as_dict(self) -> dict:
        with self._lock:
            return {g: dict(sorted(c.items())) for g, c in sorted(self._groups.items())}


@dataclass
class RetryPolicy:
    retries: int        # attempts after the first, for any failure (HTTP error or bad answer)
    base_delay: float   # seconds before the first retry; doubles with each retry
    timeout: float      # seconds a whole HTTP request may take

    def backoff(self, attempt: int) -> float:
        delay = min(self.base_delay * 2 ** attempt, MAX_BACKOFF_S)
        return delay * random.uniform(0.5, 1.0)  # jitter: workers that failed together spread out


def with_retries(attempt_fn: Callable[[int], object], policy: RetryPolicy, stats: Stats,
                 group: str):
    """Call attempt_fn(attempt) until it returns; each Retry is counted and waited out."""
    reason = "no attempt"
    for attempt in range(policy.retries + 1):
        stats.add(group, "attempts")
        if attempt:
            stats.add(group, "retries")
        try:
            return attempt_fn(attempt)
        except GiveUp as e:  # not worth retrying (a 400, say)
            stats.add(group, e.reason)
            raise GiveUp(e.reason, group) from None
        except Retry as e:
            reason = e.reason
            stats.add(group, e.reason)
            if attempt < policy.retries:
                delay = policy.backoff(attempt) if e.delay is None else e.delay
                if _STOP.wait(delay):
                    raise GiveUp("interrupted", group) from None
    raise GiveUp(reason, group)


def _retry_after(headers) -> float | None:
    """Seconds asked for by a Retry-After header (a number or an HTTP date), if any."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# The socket timeout of urllib bounds each read, so a server that trickles a byte at a time can
# hold a request for ever. A watchdog per request shuts its socket down when --timeout has passed
# since the request began, or at once when the run stops (Ctrl-C need not wait for the server).
_REQUESTS: set = set()  # the watchdogs of the requests in flight
_REQUESTS_LOCK = threading.Lock()


class _Watchdog:
    def __init__(self, timeout: float):
        self.expired = False
        self._sock = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self.expire)
        self._timer.daemon = True

    def __enter__(self):
        with _REQUESTS_LOCK:
            _REQUESTS.add(self)
        self._timer.start()
        if _STOP.is_set():
            self.expire()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with _REQUESTS_LOCK:
            _REQUESTS.discard(self)

    def attach(self, sock) -> None:
        with self._lock:
            self._sock = sock
        if self.expired:
            self.expire()

    def expire(self) -> None:
        with self._lock:
            self.expired, sock = True, self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once


def stop_requests() -> None:
    """Stop the run's requests: those in flight end now, waiting retries give up."""
    _STOP.set()
    with _REQUESTS_LOCK:
        watchdogs = list(_REQUESTS)
    for watchdog in watchdogs:
        watchdog.expire()


class _Watched:
    """An HTTP(S) connection that hands its socket to the request's watchdog once connected."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchdog = watchdog

    def connect(self):
        super().connect()
        self.watchdog.attach(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, watchdog=self.watchdog), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, watchdog=self.watchdog), req,
                            context=self._context)


def _is_http_url(url: str, base: str | None = None) -> bool:
    """Whether a URL (relative to `base`, if given) is a well-formed http:// or https:// one."""
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(base, url) if base else url)
        parts.port  # raises for a port that is no number
    except ValueError:  # "http://[::1", say
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another http(s) URL. urllib's own follows ftp:// too, where no
    watchdog bounds the request, and a URL from a dataset has no business anywhere else."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location", headers.get("uri"))  # as urllib reads it
        if location is not None and not _is_http_url(location, req.full_url):
            fp.close()
            raise GiveUp("bad_redirect")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _read_body(response, max_bytes: int | None) -> bytes:
    """The whole body; with max_bytes, GiveUp("too_large") for a longer one, refused by its
    Content-Length before reading, or else once one byte more than max_bytes has come."""
    if max_bytes is None:
        return response.read()
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdecimal() and int(declared) > max_bytes:
        raise GiveUp("too_large")
    body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise GiveUp("too_large")
    response.read()  # b"" after a whole body; IncompleteRead if the connection dropped before
    return body


def http_request(url: str, payload: dict | None = None, timeout: float = 60.0,
                 api_key: str | None = None, fatal_codes=(401, 403, 404, 405),
                 max_bytes: int | None = None) -> bytes:
    """One request: POST JSON when there is a payload, else GET; returns the body.

    Only http(s) URLs are opened, and only http(s) redirects followed (GiveUp "bad_url",
    "bad_redirect"); a body over `max_bytes` is not read (GiveUp "too_large"). `timeout` bounds
    the whole request, from connecting to the last byte. Raises Retry for what may pass
    (timeouts, dropped connections, 408, 429 and 5xx, honouring Retry-After), FatalError for
    answers that say the setup is wrong (every item would fail the same way), GiveUp for other
    client errors.
    """
    if not _is_http_url(url):
        raise GiveUp("bad_url")
    headers = {"User-Agent": "safeclip-generate-data"}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    watchdog = _Watchdog(timeout)
    # Not build_opener, which adds handlers for file://, ftp:// and data: URLs.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _WatchedHTTPHandler(watchdog),
                    _WatchedHTTPSHandler(watchdog), _HttpRedirectsOnly(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    try:
        with watchdog, opener.open(request, timeout=timeout) as response:
            body = _read_body(response, max_bytes)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in fatal_codes:
            raise FatalError(f"{url} answered HTTP {e.code} {e.reason}: check the URL, the "
                             f"model name and OPENAI_API_KEY") from None
        if e.code in (408, 425, 429) or e.code >= 500:
            raise Retry(f"http_{e.code}", _retry_after(e.headers)) from None
        raise GiveUp(f"http_{e.code}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, resets, socket timeouts
        timed_out = watchdog.expired or isinstance(e, TimeoutError) or isinstance(
            getattr(e, "reason", None), TimeoutError)
        raise Retry("timeout" if timed_out else "connection_error") from None
    if watchdog.expired:  # cut short by the watchdog: the body may be incomplete
        raise Retry("timeout")
    return body


def endpoint(url: str, path: str) -> str:
    """Accept a server's base URL, its /v1 URL or the full endpoint URL."""
    url = url.rstrip("/")
    if url.endswith(path):
        return url
    if url.endswith("/v1"):
        return url + path[len("/v1"):]
    return url + path


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise Retry("bad_json") from None


def _server_fault(reason: str) -> bool:
    """Whether a failed request says the server is unwell (rather than busy, as with 429, or the
    item unusable, as with a refusal)."""
    return reason in ("timeout", "connection_error", "bad_json", "too_large") or bool(
        re.fullmatch(r"http_5\d\d", reason))


class Servers:
    """The servers of one kind (--llm or --t2i URL,URL,...). Requests go to each in turn; a worker
    whose request failed sends its retry to another one; a server that fails
    SERVER_FAILURES_IN_A_ROW times in a row is dropped, with a line saying so, unless it is the
    last (a lone server that is down leaves the items to be rejected, as it always did)."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)  # those still in use
        self._failures = Counter()  # failures in a row, per server
        self._turn = 0
        self._lock = threading.Lock()
        self._worker = threading.local()  # the server of this thread's last failed request

    def ask(self, request: Callable[[str], object]):
        """request(url) on the next server in turn. A reply over its cap (GiveUp "too_large" from
        http_request) is the server's fault, not the item's: a Retry, like any other bad reply."""
        with self._lock:
            failed = getattr(self._worker, "failed", None)
            choices = [u for u in self.urls if u != failed] or self.urls
            url = choices[self._turn % len(choices)]
            self._turn += 1
        try:
            result = request(url)
        except GiveUp as e:
            if e.reason != "too_large":
                raise
            error = Retry("too_large")
        except Retry as e:
            error = e
        else:
            self._worker.failed = None
            with self._lock:
                self._failures[url] = 0
            return result
        self._worker.failed = url
        if _server_fault(error.reason):
            self._failed(url, error.reason)
        raise error

    def _failed(self, url: str, reason: str) -> None:
        with self._lock:
            self._failures[url] += 1
            if (self._failures[url] < SERVER_FAILURES_IN_A_ROW or url not in self.urls
                    or len(self.urls) == 1):
                return
            self.urls.remove(url)
            left = len(self.urls)
        tqdm.write(f"note: dropping {url} after {SERVER_FAILURES_IN_A_ROW} failures in a row "
                   f"(last: {reason}); going on with the other {left}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Unsafe captions from an LLM
# ---------------------------------------------------------------------------------------------


@dataclass
class ChatLLM:
    """OpenAI-compatible chat-completions servers that rewrite captions."""

    servers: Servers
    model: str
    policy: RetryPolicy
    stats: Stats
    api_key: str | None = None

    def rewrite(self, caption: str, category: str) -> str:
        payload = {"model": self.model, "messages": build_messages(caption, category),
                   "temperature": LLM_TEMPERATURE, "max_tokens": 120}

        def attempt(_):
            reply = self.servers.ask(lambda url: _parse_json(http_request(
                url, payload, self.policy.timeout, self.api_key, max_bytes=MAX_REPLY_BYTES)))
            try:
                choice = reply["choices"][0]
                content = choice["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise Retry("bad_response") from None
            if not isinstance(content, str):
                raise Retry("bad_response")
            if choice.get("finish_reason") == "length":  # cut off at max_tokens mid-sentence
                raise Retry("invalid_cut_off", delay=0)
            if len(content) > MAX_ANSWER_CHARS:  # before any pattern runs on it
                raise Retry("invalid_too_long", delay=0)
            answer = clean_answer(content)
            problem = check_answer(answer, caption)
            if problem:
                raise Retry(f"invalid_{problem}", delay=0)  # a bad answer: ask again at once
            return answer

        return with_retries(attempt, self.policy, self.stats, "llm")


# ---------------------------------------------------------------------------------------------
# Images from a text-to-image model
# ---------------------------------------------------------------------------------------------


class HttpImages:
    """OpenAI-compatible images servers (POST /v1/images/generations, b64_json answers).

    The API takes no seed, so the candidates differ only by the server's own randomness.
    """

    def __init__(self, servers: Servers, model: str | None, size: int, timeout: float,
                 api_key: str | None, max_image_bytes: int):
        self.servers, self.model, self.size = servers, model, size
        self.timeout, self.api_key, self.max_image_bytes = timeout, api_key, max_image_bytes

    def generate(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        payload = {"prompt": prompt, "n": len(seeds), "size": f"{self.size}x{self.size}",
                   "response_format": "b64_json"}
        if self.model:
            payload["model"] = self.model
        cap = len(seeds) * self.max_image_bytes * 4 // 3 + REPLY_SLACK_BYTES
        return self.servers.ask(lambda url: self._images(url, payload, cap))

    def _images(self, url: str, payload: dict, cap: int) -> list[Image.Image]:
        reply = _parse_json(http_request(url, payload, self.timeout, self.api_key, max_bytes=cap))
        entries = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(entries, list) or not entries:
            raise Retry("bad_response")
        images = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("b64_json"), str):
                if isinstance(entry, dict) and "url" in entry:
                    raise FatalError(f"{url} answered with image URLs; this script asks "
                                     f"for response_format=b64_json")
                raise Retry("bad_response")
            try:
                image = Image.open(io.BytesIO(base64.b64decode(entry["b64_json"],
                                                               validate=True)))
                image.load()
            except (ValueError, OSError, Image.DecompressionBombError):  # bad base64, no image
                raise Retry("bad_image") from None
            images.append(image.convert("RGB"))
        return images


class DiffusersImages:
    """A local diffusers pipeline (optional dependency; float16 on a GPU)."""

    def __init__(self, model_id: str, size: int, steps: int | None = None, gpu: int = 0):
        try:
            import torch
            from diffusers import AutoPipelineForText2Image
        except ImportError as e:
            raise FatalError(f"--t2i diffusers:{model_id} needs the optional packages of "
                             f"requirements-extras.txt (pip install -r requirements-extras.txt):"
                             f" {e}") from None
        self.torch = torch
        self.device = f"cuda:{gpu}" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available() and gpu >= torch.cuda.device_count():
            raise FatalError(f"LOCAL_RANK is {gpu}, but this machine has "
                             f"{torch.cuda.device_count()} GPUs: start one process per GPU "
                             f"(torchrun --nproc-per-node {torch.cuda.device_count()})")
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.pipe = AutoPipelineForText2Image.from_pretrained(model_id, torch_dtype=dtype)
        self.pipe = self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.size = size
        self.options = {"num_inference_steps": steps} if steps else {}  # else the pipeline's default
        self.lock = threading.Lock()  # one pipeline on one device: worker threads take turns

    def generate(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        generators = [self.torch.Generator(self.device).manual_seed(s) for s in seeds]
        with self.lock:
            result = self.pipe(prompt, num_images_per_prompt=len(seeds), generator=generators,
                               height=self.size, width=self.size, **self.options)
        return [image.convert("RGB") for image in result.images]


def load_keep_rule(spec: str) -> Callable:
    """--keep-rule module:function or path/to/file.py:function.

    The function gets (images: list[PIL.Image], prompt: str, kind: "safe" | "unsafe") and returns
    the index of the image to keep, or None to reject them all (and try new seeds). Safe-CLIP
    keeps, of three seeds, an unsafe image that an NSFW classifier flags.
    """
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise InputError(f"--keep-rule {spec!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location("keep_rule", module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as e:
        raise InputError(f"--keep-rule {spec!r}: cannot import {module_name} ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"--keep-rule {spec!r}: {module_name} has no function {function_name}")
    return function


# ---------------------------------------------------------------------------------------------
# The output folder: resume, manifest
# ---------------------------------------------------------------------------------------------


def _by_content(recipe: dict) -> dict:
    """A recipe read from an older manifest, in the form this version writes.

    Older versions named the source by its path ("file", next to its "sha256"), so the same
    content elsewhere was refused; the path is provenance now, outside the recipe. A path
    without a hash is hashed here, if the file is still there.
    """
    source = dict(recipe.get("source") or {})
    path = source.pop("file", None)
    if path and "sha256" not in source and os.path.isfile(path):
        source["sha256"] = _file_digest(Path(path))
    return {**recipe, "source": source}


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path}: damaged ({e}); delete {path.parent} to start over") from None


def _images_on_disk(root: Path, row: dict) -> bool:
    """Whether a row's generated images are in the folder (a path that is absolute is the
    source's own file)."""
    return all(path is None or os.path.isabs(path) or (root / path).is_file()
               and (root / path).stat().st_size > 0
               for path in (row.get("safe_image"), row.get("unsafe_image")))


@dataclass
class Progress:
    """What a folder's files record, read only: the rows whose images are on disk, the LLM's
    answers, the rejections as they happened and the manifest."""

    rows: list[dict]
    answers: list[dict]
    rejections: list[dict]
    manifest: dict

    @classmethod
    def read(cls, folder: Path, root: Path) -> "Progress":
        return cls([r for r in _whole_lines(folder / "pairs.jsonl") if _images_on_disk(root, r)],
                   _whole_lines(folder / "unsafe_captions.jsonl"),
                   _whole_lines(folder / "rejected.jsonl"),
                   _read_manifest(folder / "manifest.json") or {})


class OutputDir:
    """DIR with pairs.jsonl, images/, manifest.json and the LLM's answers; resumable.

    A share of a torchrun job keeps the same files in DIR/shards/RANK/ and reads the dataset's own
    (`inherited`) without writing them: rank 0 writes those only before the shares start and once
    they are all done.
    """

    def __init__(self, root: Path, share: Share | None = None):
        self.root, self.share = root, share
        self.folder = root if share is None else root / "shards" / str(share.rank)
        self.folder.mkdir(parents=True, exist_ok=True)
        # The dataset's lock, held by the only process or by rank 0 for the whole job.
        self._lock = _lock_folder(root) if share is None else None
        self.manifest_path = self.folder / "manifest.json"
        self.previous = _read_manifest(self.manifest_path)
        self.pairs = JsonlLog(self.folder / "pairs.jsonl")
        self.answers = JsonlLog(self.folder / "unsafe_captions.jsonl")
        self.rejections = JsonlLog(self.folder / "rejected.jsonl")
        self.inherited = Progress.read(root, root) if share else Progress([], [], [], {})
        if share is None:
            if self.previous is None and self.pairs.rows:
                raise InputError(f"{root} holds a pairs.jsonl without manifest.json: it was not "
                                 f"made by this script; choose another --out")
            for temp in (root / "images").rglob("*.tmp-*") if (root / "images").is_dir() else ():
                temp.unlink()  # a half-written image from a killed run

    def close(self) -> None:
        self.pairs.close()
        self.answers.close()
        self.rejections.close()
        if self._lock:
            self._lock.close()  # releases the lock

    def check_recipe(self, recipe: dict) -> None:
        recipe = json.loads(json.dumps(recipe))  # compare as it reads back from the file
        old = (self.previous or {}).get("recipe")
        if old is not None:
            old = _by_content(old)
        if old is not None and old != recipe:
            changed = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise InputError(f"{self.root} already holds data made with other options "
                             f"({', '.join(changed)} differ); use another --out, or delete "
                             f"{self.root} to start over")

    def previous_source_file(self) -> str | None:
        """Where the previous run read its source (older versions named it in the recipe)."""
        previous = self.previous or {}
        old_source = previous.get("recipe", {}).get("source", {})
        return previous.get("source_file") or old_source.get("file")

    def share_folders(self) -> list[Path]:
        """The progress folders of torchrun's shares (of this job, or of one that died)."""
        shards = self.root / "shards"
        return sorted((f for f in shards.iterdir() if f.is_dir()), key=lambda f: f.name) \
            if shards.is_dir() else []

    def finished_rows(self) -> dict[str, dict]:
        """Rows already written whose generated images are on disk, by id (last one wins)."""
        done = {}
        for row in self.pairs.rows:
            if _images_on_disk(self.root, row):
                done[row["id"]] = row
        if len(done) != len(self.pairs.rows):  # duplicates or lost images: keep the good rows
            self.pairs.rewrite(sorted(done.values(), key=lambda r: int(r["id"])))
        return done

    def write_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False)
                                          + "\n").encode("utf-8"))


def rejected_for_content(reason: str, stage: str | None = None) -> bool:
    """Whether a rejection came from the item itself (the model's answers to it, no image kept, a
    4xx for its request, where its URL leads) rather than from a server that was down or
    overloaded."""
    return (reason.startswith("invalid_") or reason == "kept_none"
            or stage == "download" and reason in DOWNLOAD_CONTENT
            or bool(re.fullmatch(r"http_4\d\d", reason)) and reason not in
            ("http_408", "http_425", "http_429"))


class Job:
    """One run over the dataset, or over a share of it under torchrun: the items, what is done,
    what was rejected, and the manifest that says so."""

    def __init__(self, out: OutputDir, plan: Plan, retry_rejected: bool = False):
        self.out, self.recipe, self.backends = out, plan.recipe, plan.backends
        self.retry_rejected, self.source_file = retry_rejected, plan.source_file
        self.share = out.share or Share()
        self.total = len(range(self.share.rank, plan.total, self.share.world))  # ids 0..total-1
        previous = out.previous or {}
        self.stats = Stats(previous.get("requests"))
        mine = self.share.owns
        self.done = {r["id"]: r for r in out.inherited.rows if mine(r["id"])}
        self.done.update(out.finished_rows())
        self.answers = {a["id"]: a for a in out.inherited.answers + out.answers.rows}
        self.rejected: dict[str, dict] = {}
        self._note_rejections(out.inherited.manifest.get("rejected", []) + out.inherited.rejections
                              + previous.get("rejected", []) + out.rejections.rows)
        self.earlier: set[str] = set()
        self._staged: list[dict] = []   # finished rows not yet in pairs.jsonl
        self._answers: list[dict] = []  # answers not yet in unsafe_captions.jsonl
        self._committed_at = time.monotonic()
        self._in_a_row = 0
        self._saved_at = 0.0
        if out.share is None:
            self.take_in_shares()  # of a job that died
        # What earlier runs rejected for its content would most likely be rejected again: it is
        # asked again only with --retry-rejected, after every new item, and outside the count of
        # rejections in a row (which is there to notice a dead server, not a refused category).
        self.earlier = {i for i, r in self.rejected.items()
                        if rejected_for_content(r["reason"], r.get("stage"))}

    def _note_rejections(self, rejections: list[dict]) -> None:
        """Rejections as recorded (the manifest's list, refreshed every few seconds, and
        rejected.jsonl, at each one: together they know every rejection of a killed run), in
        order. A row or an LLM answer made since settles one."""
        self.rejected.update((r["id"], r) for r in rejections if self.share.owns(r["id"]))
        for i in [i for i, r in self.rejected.items()
                  if i in self.done or r["stage"] == "llm" and i in self.answers]:
            del self.rejected[i]

    def take_in_shares(self) -> None:
        """Fold the progress folders of torchrun's shares into the dataset, then delete them: their
        rows, answers and rejections into its files, their request counts into its manifest. Rank 0
        does it once every share is done, and any run at its start for a job that died."""
        for folder in self.out.share_folders():
            share = Progress.read(folder, self.out.root)
            self.out.pairs.append(*share.rows)
            self.out.answers.append(*share.answers)
            self.out.rejections.append(*share.rejections)
            self.done.update((r["id"], r) for r in share.rows)
            self.answers.update((a["id"], a) for a in share.answers)
            self._note_rejections(share.rejections)
            self.stats.merge(share.manifest.get("requests", {}))
            # The counts are in the manifest before the folder goes (a crash in between would
            # count that share's requests twice, and change nothing else).
            self.save()
            shutil.rmtree(folder)
        with contextlib.suppress(FileNotFoundError):
            (self.out.root / "shards").rmdir()

    def schedule(self, items: list[Item]) -> list[Item]:
        """The items to try in this run, in order: new ones, then (--retry-rejected) the others."""
        fresh = [it for it in items if it.id not in self.earlier]
        again = [it for it in items if it.id in self.earlier]
        return fresh + again if self.retry_rejected else fresh

    def accept(self, *rows: dict) -> None:
        """Rows are finished: write them (one write and fsync for the lot)."""
        self.out.pairs.append(*rows)
        for row in rows:
            self.done[row["id"]] = row
            self.rejected.pop(row["id"], None)
        self._in_a_row = 0
        self.save(every=MANIFEST_EVERY_S)

    def stage(self, row: dict) -> None:
        """A finished row, committed with others by commit_due()."""
        self._staged.append(row)
        self.commit_due()

    def commit_due(self) -> None:
        """Commit the staged rows and answers once there are ROWS_PER_COMMIT of either, or
        COMMIT_EVERY_S after the last commit."""
        staged = max(len(self._staged), len(self._answers))
        if staged >= ROWS_PER_COMMIT or (
                staged and time.monotonic() - self._committed_at >= COMMIT_EVERY_S):
            self.commit()

    def commit(self) -> None:
        # A batch leaves its list only once written: if the write is cut short (Ctrl-C, a full
        # disk), stop() writes it again, and a line written twice reads back as one.
        if self._answers:
            self.out.answers.append(*self._answers)
            self._answers = []
        if self._staged:
            self.accept(*self._staged)
            self._staged = []
        self._committed_at = time.monotonic()

    def keep_answer(self, item: Item, unsafe: str) -> None:
        """The LLM wrote an item's unsafe caption: remember it (committed with others by
        commit_due()), so that no run asks for it again."""
        item.unsafe = unsafe
        self.answers[item.id] = {"id": item.id, "unsafe": unsafe, "category": item.category}
        self._answers.append(self.answers[item.id])
        self.rejected.pop(item.id, None)
        self._in_a_row = 0
        self.commit_due()

    def reject(self, item: Item, stage: str | None, reason: str) -> None:
        runs = self.rejected.get(item.id, {}).get("runs", 0) + 1
        self.rejected[item.id] = {"id": item.id, "safe": item.safe, "stage": stage,
                                  "reason": reason, "runs": runs}
        self.out.rejections.append(self.rejected[item.id])
        self.stats.add(stage, "rejected_items")
        self._in_a_row += item.id not in self.earlier and not (
            stage == "download" and reason in DOWNLOAD_CONTENT)
        if self._in_a_row >= MAX_REJECTED_IN_A_ROW:
            raise FatalError(f"{self._in_a_row} items in a row were rejected (last: {reason}); "
                             f"stopping. Check the server and model, then run the same command "
                             f"again to resume")
        self.save(every=MANIFEST_EVERY_S)

    def stop(self, status: str) -> None:
        """Commit what is finished and record why the run ended early. On a full disk the lines
        that fit are committed, and the manifest is tried all the same."""
        try:
            self.commit()
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
        self.save(status)

    def save(self, status: str = "running", every: float = 0.0) -> None:
        if every and time.monotonic() - self._saved_at < every:
            return
        self._saved_at = time.monotonic()
        rows = self.done.values()
        self.out.write_manifest({
            "generator": "generate_data.py",
            "status": status,
            "recipe": self.recipe,
            "source_file": self.source_file,
            "backends": self.backends,
            "retry_rejected": self.retry_rejected,
            "counts": {
                "items": self.total,
                "rows": len(self.done),
                "rejected": len(self.rejected),
                "not_retried": self.not_retried(),
                "pending": self.total - len(self.done) - len(self.rejected),
                "by_split": dict(sorted(Counter(r.get("split") for r in rows).items())),
                "by_category": dict(sorted(Counter(str(r.get("category")) for r in rows).items())),
            },
            "requests": self.stats.as_dict(),
            "rejected": [self.rejected[k] for k in sorted(self.rejected, key=int)],
        })

    def not_retried(self) -> int:
        """Items rejected for their content by an earlier run that this run left alone."""
        return 0 if self.retry_rejected else len(self.earlier & set(self.rejected))

    def finish(self) -> None:
        """A share: say it is complete. The dataset: take in the shares, put the rows in input
        order (the file no longer depends on timing or on the processes) and say so."""
        self.commit()
        if self.out.share is None:
            self.take_in_shares()
            self.out.pairs.rewrite(sorted(self.done.values(), key=lambda r: int(r["id"])))
        self.save("complete")


# ---------------------------------------------------------------------------------------------
# Many processes: torchrun's shares of one dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """The items one process makes: those whose index is `rank` modulo `world` (torchrun's RANK
    and WORLD_SIZE), so that shares depend on the ids alone; a process on its own makes them all."""

    rank: int = 0
    world: int = 1
    gpu: int = 0  # LOCAL_RANK: the process's GPU on its machine

    def owns(self, item_id: str) -> bool:
        return int(item_id) % self.world == self.rank


def join_job() -> Share:
    """This process's share. Under torchrun (WORLD_SIZE above 1) it joins the job's process group
    first, over which rank 0 says when the folder is ready and learns when every share is done."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Share()
    import torch.distributed  # torchrun comes with torch

    import safeclip
    rank, world, gpu = safeclip.dist_info()
    # gloo, on the CPU, whatever draws the images. The barrier at the end waits for the slowest
    # share, which may take days.
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    return Share(rank, world, gpu)


def open_job(args, plan: Plan, share: Share) -> tuple[Job | None, Job]:
    """The dataset's job (the only process's, or rank 0's) and this process's. Rank 0 takes the
    folder for the whole job first (the lock, the recipe check, the shares of a job that died);
    the other processes wait for it, and stop with its error if it could not."""
    dataset, error = None, None
    if share.rank == 0:
        out = None
        try:
            out = OutputDir(args.out)
            out.check_recipe(plan.recipe)
            moved_from = out.previous_source_file()
            if moved_from and plan.source_file and moved_from != plan.source_file:
                print(f"note: the source moved from {moved_from} to {plan.source_file}; its "
                      f"content is the same, so the run resumes", file=sys.stderr)
            dataset = Job(out, plan, args.retry_rejected)
            dataset.save()
        except BaseException as e:
            if out is not None:
                out.close()
            if not isinstance(e, (InputError, FatalError)) or share.world == 1:
                raise
            error = e
    if share.world == 1:
        return dataset, dataset
    import safeclip
    error = safeclip.from_rank0(error)
    if error is not None:
        raise error
    return dataset, Job(OutputDir(args.out, share), plan, args.retry_rejected)


def wait_for_every_share() -> None:
    import torch.distributed
    try:
        torch.distributed.barrier()
    except RuntimeError:  # gloo's word for a process of the job that died
        raise FatalError("another process of this job stopped before its share was done; run "
                         "the same command again to resume") from None


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def run_threads(fn: Callable, items: list, workers: int, handle: Callable,
                tick: Callable = lambda: None) -> None:
    """Apply fn to the items on worker threads and pass each (item, result or GiveUp) to handle()
    on this thread as it finishes; call tick() at least once a second meanwhile.

    At most 2 * workers items are in flight, so an interrupted run has little to lose. On Ctrl-C
    or a fatal error the requests in flight are abandoned at once, and results that had already
    arrived are handed over first, so that they are saved.
    """
    def call(item):
        try:
            return fn(item)
        except GiveUp as e:
            return e

    pending = iter(items)
    in_flight = {}
    pool = ThreadPoolExecutor(max_workers=workers)

    def submit_next():
        for item in pending:
            in_flight[pool.submit(call, item)] = item
            return

    try:
        for _ in range(2 * workers):
            submit_next()
        while in_flight:
            finished, _ = wait(in_flight, timeout=COMMIT_EVERY_S, return_when=FIRST_COMPLETED)
            tick()
            for future in finished:
                item = in_flight.pop(future)
                handle(item, future.result())  # a FatalError or a bug stops everything
                submit_next()
    except (KeyboardInterrupt, FatalError):
        stop_requests()
        for future, item in list(in_flight.items()):
            if future.done() and not future.cancelled() and future.exception() is None \
                    and not isinstance(future.result(), GiveUp):
                handle(item, future.result())
        raise
    except BaseException:
        stop_requests()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # quick: the requests were stopped


def _progress(job: Job, total: int, desc: str):
    """A progress bar; under torchrun, rank 0's only, for its share."""
    if job.share.world > 1:
        desc = f"{desc}, share {job.share.rank + 1} of {job.share.world}"
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, mininterval=0.5,
                disable=job.share.rank > 0)


def caption_phase(job: Job, items: list[Item], llm: ChatLLM, workers: int) -> None:
    """Ask the LLM for the unsafe captions the source lacks (remembered across runs)."""
    todo = []
    for item in items:
        if item.unsafe is None and item.id in job.answers:
            item.unsafe = job.answers[item.id]["unsafe"]
        elif item.unsafe is None and item.id not in job.done:
            todo.append(item)
    todo = job.schedule(todo)
    if not todo:
        return
    with _progress(job, len(todo), "unsafe captions (LLM)") as bar:
        def handle(item, result):
            if isinstance(result, GiveUp):
                job.reject(item, result.stage, result.reason)
            else:
                job.keep_answer(item, result)
            bar.update()

        run_threads(lambda it: llm.rewrite(it.safe, it.category), todo, workers, handle,
                    tick=job.commit_due)
    job.commit()  # every answer is on disk before the images, which take far longer


@dataclass
class ImageMaker:
    """Makes the images an item lacks: fetches URLs, or asks the text-to-image backend."""

    root: Path
    backend: object | None      # HttpImages, DiffusersImages or None (--text-only)
    keep_rule: Callable | None
    candidates: int             # images per unsafe prompt (--seeds-per-prompt)
    seed: int
    policy: RetryPolicy
    stats: Stats

    fetch: bool = True          # download safe images from their URLs (not with --text-only)
    max_image_bytes: int | None = None  # a larger download rejects its row (--max-image-mb)
    first_row: dict = field(default_factory=dict)  # URL -> the index its file is named after
    fetched: dict = field(default_factory=dict)  # URL -> its file, so each URL is fetched once
    _url_locks: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def row(self, item: Item) -> dict:
        row = {"id": item.id, "safe": item.safe, "unsafe": item.unsafe}
        if item.safe_image:
            row["safe_image"] = item.safe_image
        elif self.fetch and item.safe_image_url:
            row["safe_image"] = self.download(item)
        elif self.backend:
            row["safe_image"] = self.generate(item, "safe", item.safe, 1)
        if item.unsafe_image:
            row["unsafe_image"] = item.unsafe_image
        elif self.backend:
            row["unsafe_image"] = self.generate(item, "unsafe", item.unsafe, self.candidates)
        row.update(category=item.category, split=item.split, **item.extra)
        return row

    def generate(self, item: Item, kind: str, prompt: str, n: int) -> str:
        relative = image_path(item.index, kind)

        def attempt(k):
            seeds = [derive_seed(self.seed, item.id, kind, k, j) for j in range(n)]
            images = self.backend.generate(prompt, seeds)
            pick = self.keep_rule(images, prompt, kind) if self.keep_rule else 0
            if pick is None:
                raise Retry("kept_none", delay=0)
            try:  # numpy and torch integers (np.argmax(...)) are indices too
                index = None if isinstance(pick, bool) else operator.index(pick)
            except TypeError:
                index = None
            if index is None or not 0 <= index < len(images):
                raise FatalError(f"the keep rule returned {pick!r}; expected None or an index "
                                 f"below {len(images)}")
            save_png(images[index], self.root / relative)
            return relative

        return with_retries(attempt, self.policy, self.stats, "t2i")

    def download(self, item: Item) -> str:
        """The item's safe image from its URL; a URL that several rows share is fetched once."""
        url = item.safe_image_url
        with self._lock:
            lock = self._url_locks.setdefault(url, threading.Lock())
        with lock:
            if url not in self.fetched:
                self.fetched[url] = self._fetch(item)
            return self.fetched[url]

    def _fetch(self, item: Item) -> str:
        def attempt(_):
            data = http_request(item.safe_image_url, timeout=self.policy.timeout, fatal_codes=(),
                                max_bytes=self.max_image_bytes)
            image_format = _image_format(data)
            suffix = {"JPEG": "jpg"}.get(image_format, str(image_format).lower())
            relative = image_path(self.first_row.get(item.safe_image_url, item.index), "safe",
                                  suffix)
            write_atomic(self.root / relative, data)  # the original bytes, not re-encoded
            return relative

        return with_retries(attempt, self.policy, self.stats, "download")


def _image_format(data: bytes) -> str:
    """The format of a downloaded image. GiveUp for bytes that Pillow cannot read as an image (an
    HTML page, a broken file: "bad_image") or for more pixels than Pillow's decompression-bomb
    limit ("too_many_pixels"); both are the row's content, not worth a retry."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise GiveUp("too_many_pixels")
            image.verify()
            return image.format
    except GiveUp:
        raise
    except Image.DecompressionBombError:  # over twice the limit, from Image.open; no OSError
        raise GiveUp("too_many_pixels") from None
    except Exception:  # Pillow's readers raise many kinds on broken files: these are anyone's
        raise GiveUp("bad_image") from None


def image_phase(job: Job, items: list[Item], maker: ImageMaker, workers: int,
                desc: str) -> None:
    todo = job.schedule([it for it in items if it.id not in job.done and it.unsafe is not None])
    if not todo:
        return
    with _progress(job, len(todo), desc) as bar:
        def handle(item, result):
            if isinstance(result, GiveUp):
                job.reject(item, result.stage, result.reason)
            else:
                job.stage(result)
            bar.update()

        run_threads(maker.row, todo, workers, handle, tick=job.commit_due)


def write_zeroshot_set(folder: Path, seed: int, per_class: int, size: int) -> None:
    """The toy world's held-out zero-shot set, in the layout `evaluate.py --zeroshot` reads:
    folder/COLOUR/NNNN.png (one object alone, no stand-in, never a training scene) and the
    prompts in folder/templates.txt (for --templates). Files already there are kept, as rows are."""
    for colour in toy_world.COLOURS:
        for k in range(per_class):
            path = folder / colour / f"{k:04d}.png"
            if not path.exists():
                scene = toy_world.zeroshot_scene(k, seed, colour)
                save_png(toy_world.render_toy(scene, size, unsafe=False), path)
    write_atomic(folder / "templates.txt", "".join(t + "\n" for t in toy_world.ZEROSHOT_TEMPLATES).encode())


def toy_phase(job: Job, ids: list[str], seed: int, categories: dict, splits: dict, size: int,
              workers: int, zeroshot_per_class: int) -> None:
    """Draw the zero-shot set (rank 0) and the toy quadruplets of this share not done yet, on
    `workers` processes."""
    if job.share.rank == 0:
        write_zeroshot_set(job.out.root / "zeroshot", seed, zeroshot_per_class, size)
    tasks = [(int(i), seed, categories[i], splits[i], size, str(job.out.root))
             for i in ids if job.share.owns(i) and i not in job.done]
    if not tasks:
        return
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        rows = pool.imap(make_toy_row, tasks, chunksize=8) if pool else map(make_toy_row, tasks)
        batch = []
        with _progress(job, len(tasks), "toy world") as bar:
            for row in rows:
                batch.append(row)
                bar.update()
                # A toy row costs about a millisecond and an fsync several: commit in batches.
                if len(batch) == TOY_ROWS_PER_COMMIT:
                    job.accept(*batch)
                    batch = []
        if batch:
            job.accept(*batch)
    finally:
        if pool:
            pool.terminate()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three non-negative fractions for "
                                         f"train,val,test, such as 0.8,0.1,0.1")
    return tuple(p / sum(parts) for p in parts)


def parse_categories(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(c.strip().lower() for c in text.split(",") if c.strip()))
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown category {', '.join(map(repr, unknown))}; "
                                         f"choose from: {', '.join(CATEGORIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_data.py",
        description="Build Safe-CLIP quadruplets (safe caption, unsafe caption, safe image,\n"
                    "unsafe image) in DIR/pairs.jsonl and DIR/images/ from a toy world, captions,\n"
                    "ViSU-Text or NSFWCaps: an LLM writes missing unsafe captions, a text-to-image\n"
                    "model draws missing images. Re-run the same command to resume.",
        epilog="examples:\n"
               "  %(prog)s --toy 3000 --out data/toy\n"
               "  %(prog)s --captions captions.txt --llm http://localhost:8000 --llm-model "
               "Qwen/Qwen2.5-7B-Instruct \\\n"
               "      --t2i diffusers:stabilityai/stable-diffusion-2-1 --out data/mine\n"
               "  %(prog)s --from-visu visu_test.json --coco-root /data/coco --out data/visu\n"
               "  %(prog)s --from-nsfwcaps nsfwcaps.csv --out data/nsfwcaps\n"
               "  %(prog)s --captions data/visu/pairs.jsonl --t2i http://localhost:9000 "
               "--out data/visu-images\n"
               "  torchrun --nproc-per-node 8 %(prog)s --captions data/visu/pairs.jsonl \\\n"
               "      --t2i diffusers:stabilityai/stable-diffusion-2-1 --out data/visu-images",
        formatter_class=argparse.RawDescriptionHelpFormatter)

    source = parser.add_argument_group("source (pick one)")
    one = source.add_mutually_exclusive_group(required=True)
    one.add_argument("--toy", type=int, metavar="N",
                     help="draw N quadruplets of the offline toy world (no model, no network)")
    one.add_argument("--captions", type=Path, metavar="FILE",
                     help="safe captions: text (one per line), a JSON list or JSON lines with "
                          "'caption' and optional 'image', 'unsafe', 'category', 'split'")
    one.add_argument("--from-visu", type=Path, metavar="FILE",
                     help="ViSU-Text rows (safe, nsfw, tag, coco_id, split, nsfw_im_path) as a "
                          "JSON list, JSON lines, an object keyed by id or {info, data}")
    one.add_argument("--from-nsfwcaps", type=Path, metavar="FILE",
                     help="NSFWCaps rows (image_coco_url, caption, nsfw_caption, "
                          "chosen_category) as JSON, JSON lines or CSV")
    source.add_argument("--coco-root", type=Path, metavar="DIR",
                        help="with --from-visu: COCO folder holding train2017/ and val2017/")
    source.add_argument("--image-dir", type=Path, metavar="DIR",
                        help="with --from-nsfwcaps: folder of the images (named as in the rows "
                             "or as the URLs' file names); without it URLs are downloaded")

    llm = parser.add_argument_group("unsafe captions")
    llm.add_argument("--llm", metavar="URL",
                     help="OpenAI-compatible server (base URL, .../v1 or the full "
                          "/v1/chat/completions URL) for rows without an unsafe caption; "
                          "several as URL,URL,... share the requests")
    llm.add_argument("--llm-model", metavar="NAME", help="model name sent to --llm")
    llm.add_argument("--categories", type=parse_categories, metavar="LIST",
                     help="comma-separated categories to inject, dealt evenly over the items "
                          "(default: all 20 of SAFECLIP.md; the toy world draws all but "
                          "'child abuse')")

    images = parser.add_argument_group("images")
    images.add_argument("--t2i", metavar="SPEC",
                        help="diffusers:MODEL_ID (local pipeline, needs requirements-extras.txt; "
                             "on cuda:LOCAL_RANK under torchrun) or the URL of an "
                             "OpenAI-compatible images server (several as URL,URL,...)")
    images.add_argument("--t2i-model", metavar="NAME", help="model name sent to an images server")
    images.add_argument("--t2i-steps", type=int, metavar="N",
                        help="denoising steps of a diffusers:MODEL_ID pipeline (default: the "
                             "pipeline's own, e.g. 50 for Stable Diffusion; distilled 'turbo' "
                             "models want 1 to 4)")
    images.add_argument("--seeds-per-prompt", type=int, metavar="K",
                        help="candidate images per unsafe prompt, one kept by --keep-rule "
                             "(default: 3 with a keep rule, else 1)")
    images.add_argument("--keep-rule", metavar="MODULE:FUNCTION",
                        help="picks the image to keep: f(images, prompt, kind) -> index or None "
                             "(module name or path/to/file.py)")
    images.add_argument("--image-size", type=int, metavar="PX",
                        help="side of generated images (default: 64 for --toy, 512 otherwise)")
    images.add_argument("--text-only", action="store_true",
                        help="stop at captions: rows keep only the image files the source has "
                             "(no URL is fetched)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder; re-running the same command there resumes")
    output.add_argument("--split", type=parse_split, default=(0.8, 0.1, 0.1),
                        metavar="TRAIN,VAL,TEST",
                        help="split fractions for rows without a split (default: 0.8,0.1,0.1)")
    output.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (default: 0)")

    requests = parser.add_argument_group("requests")
    requests.add_argument("--workers", type=int, metavar="N",
                          help="concurrent requests (default: 8), or drawing processes with "
                               "--toy (default: 1)")
    requests.add_argument("--timeout", type=float, default=120.0, metavar="S",
                          help="seconds a whole HTTP request may take, from connecting to "
                               "the last byte (default: 120)")
    requests.add_argument("--retries", type=int, default=4, metavar="N",
                          help="retries per item after an error or an unusable answer "
                               "(default: 4)")
    requests.add_argument("--retry-base-delay", type=float, default=1.0, metavar="S",
                          help="first backoff in seconds, doubled each retry; a server's "
                               "Retry-After wins (default: 1)")
    requests.add_argument("--max-image-mb", type=float, default=50.0, metavar="MB",
                          help="largest image a source's URL may send (default: 50); a larger "
                               "one rejects its row, as do URLs and redirects that are not "
                               "http(s) and images that do not decode or hold more pixels "
                               "than Pillow's decompression-bomb limit; an images server's "
                               "reply may hold that much per image asked for")
    requests.add_argument("--retry-rejected", action="store_true",
                          help="on resume, ask again for the items an earlier run rejected for "
                               "their content (refusals, unusable answers, no image kept, dead or "
                               "oversized image URLs), after every new item; by default they "
                               "stay rejected")
    return parser


def _check_options(parser: argparse.ArgumentParser, args) -> None:
    if args.toy is not None:
        if args.toy < 1:
            parser.error("--toy N needs N >= 1")
        for flag in ("llm", "llm_model", "t2i", "t2i_model", "t2i_steps", "seeds_per_prompt", "keep_rule",
                     "coco_root", "image_dir", "retry_rejected"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} does not apply to --toy")
        if args.text_only:
            parser.error("--text-only does not apply to --toy")
        missing = [c for c in args.categories or () if c not in toy_world.TOY_CONCEPTS]
        if missing:
            parser.error(f"the toy world draws no stand-in for {', '.join(missing)}")
    if args.coco_root and not args.from_visu:
        parser.error("--coco-root goes with --from-visu")
    if args.image_dir and not args.from_nsfwcaps:
        parser.error("--image-dir goes with --from-nsfwcaps")
    if args.llm and not args.llm_model:
        parser.error("--llm needs --llm-model NAME")
    if args.t2i and args.text_only:
        parser.error("--t2i and --text-only exclude each other")
    if args.keep_rule and not args.t2i:
        parser.error("--keep-rule goes with --t2i")
    for flag, urls in (("--llm", args.llm), ("--t2i", args.t2i)):
        for url in [] if not urls or urls.startswith("diffusers:") else urls.split(","):
            # "localhost:8000" parses as scheme "localhost": refuse it now, not after retries.
            if not re.match(r"https?://[^/?#,]+", url.strip()):
                parser.error(f"{flag} {url}: expected a URL starting with http:// or https://, "
                             f"such as http://{url.strip().split('://')[-1]}")
    if args.t2i_steps is not None and not (args.t2i or "").startswith("diffusers:"):
        parser.error("--t2i-steps goes with --t2i diffusers:MODEL_ID")
    for flag in ("workers", "seeds_per_prompt", "image_size", "t2i_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.retries < 0 or args.timeout <= 0 or args.retry_base_delay < 0:
        parser.error("--timeout must be positive; --retries and --retry-base-delay not negative")
    if not (args.max_image_mb > 0 and math.isfinite(args.max_image_mb)):
        parser.error("--max-image-mb must be positive")


def _load_items(args) -> tuple[list[Item], dict]:
    if args.captions:
        kind, path, items = "captions", args.captions, load_captions(args.captions)
    elif args.from_visu:
        kind, path, items = "visu", args.from_visu, load_visu(args.from_visu, args.coco_root)
    else:
        kind, path = "nsfwcaps", args.from_nsfwcaps
        items = load_nsfwcaps(args.from_nsfwcaps, args.image_dir)
    if not items:
        raise InputError(f"{path}: no rows")
    # The content identifies the source, not the path: a moved file resumes (main says so).
    return items, {"kind": kind, "sha256": _file_digest(path), "rows": len(items)}


@dataclass
class Plan:
    """What a run will make: its recipe (checked on resume), provenance, size and the work."""

    recipe: dict
    backends: dict
    total: int
    run: Callable[[Job], None]
    source_file: str | None = None  # provenance only: the recipe has the file's content hash


def plan_toy(args) -> Plan:
    size = args.image_size or 64
    categories = args.categories or TOY_CATEGORIES
    ids = [f"{i:06d}" for i in range(args.toy)]
    splits = assign_splits(ids, args.split, args.seed)
    dealt = assign_categories(ids, categories, args.seed)
    workers = args.workers or 1  # a quadruplet costs ~2 ms: processes pay off only for big N
    # As many zero-shot images as test quadruplets, at least two per class.
    zeroshot_per_class = max(2, round(args.toy * args.split[2] / len(toy_world.COLOURS)))
    recipe = {"source": {"kind": "toy", "n": args.toy, "version": toy_world.TOY_VERSION},
              "seed": args.seed, "split": list(args.split), "categories": list(categories),
              "image_size": size}
    backends = {"toy": {"version": toy_world.TOY_VERSION, "stand_ins": sorted(toy_world.STAND_INS),
                        "zeroshot": {"classes": sorted(toy_world.COLOURS),
                                     "per_class": zeroshot_per_class}}}
    return Plan(recipe, backends, args.toy,
                lambda job: toy_phase(job, ids, args.seed, dealt, splits, size, workers,
                                      zeroshot_per_class))


def _check_safe_images(args, items: list[Item]) -> None:
    """Without --t2i or --text-only, every row needs a safe image that the source provides."""
    # ViSU and NSFWCaps publish no unsafe images: their rows are usable as they are, with
    # the safe image only (training then skips the two terms that need one).
    if args.captions:
        raise InputError("the unsafe images need a text-to-image model: pass --t2i "
                         "diffusers:MODEL_ID or --t2i URL, or --text-only to stop at captions")
    if args.from_visu and not args.coco_root:
        raise InputError("--from-visu needs --coco-root DIR (COCO 2017's train2017/ and "
                         "val2017/) for the safe images; or --t2i to draw them, or "
                         "--text-only to stop at captions")
    imageless = [it for it in items if not (it.safe_image or it.safe_image_url)]
    if imageless:
        raise InputError(f"{args.from_nsfwcaps}: row {imageless[0].index + 1} has no image URL "
                         f"or file name ({len(imageless)} such rows); pass --t2i to draw "
                         f"the safe images, or --text-only to stop at captions")


def _servers(spec: str, path: str) -> Servers:
    """--llm or --t2i URL,URL,...: their endpoints."""
    return Servers([endpoint(url.strip(), path) for url in spec.split(",")])


def _t2i_setup(args, api_key: str | None, share: Share) -> tuple[dict, dict, object,
                                                                  Callable | None, int]:
    """--t2i: its recipe entry, its manifest entry (the recipe's and the servers' URLs), the
    backend (a diffusers pipeline on this process's GPU), the keep rule and how many candidate
    images an unsafe prompt gets."""
    size = args.image_size or 512
    candidates = args.seeds_per_prompt or (3 if args.keep_rule else 1)
    model_id = args.t2i[len("diffusers:"):] if args.t2i.startswith("diffusers:") else None
    recipe = {"backend": "diffusers" if model_id else "http",
              "model": model_id or args.t2i_model, "image_size": size,
              "seeds_per_prompt": candidates, "keep_rule": args.keep_rule}
    if args.t2i_steps:
        recipe["steps"] = args.t2i_steps
    described = dict(recipe)
    # Build the backend now, so that a missing package or a bad hook fails before any work.
    keep_rule = load_keep_rule(args.keep_rule) if args.keep_rule else None
    if model_id:
        backend = DiffusersImages(model_id, size, args.t2i_steps, share.gpu)
    else:
        servers = _servers(args.t2i, "/v1/images/generations")
        described["urls"] = list(servers.urls)
        backend = HttpImages(servers, args.t2i_model, size, args.timeout, api_key,
                             round(args.max_image_mb * MB))
    return recipe, described, backend, keep_rule, candidates


def plan_sources(args, share: Share) -> Plan:
    items, source = _load_items(args)
    need_llm = [it for it in items if it.unsafe is None]
    if need_llm and not args.llm:
        raise InputError(f"{len(need_llm)} rows have no unsafe caption (the first is row "
                         f"{need_llm[0].index + 1}); pass --llm URL --llm-model NAME")
    categories = args.categories or CATEGORIES
    fill_in_categories_and_splits(items, categories, args.split, args.seed)
    if not args.t2i and not args.text_only:
        _check_safe_images(args, items)

    recipe = {"source": source, "seed": args.seed, "split": list(args.split),
              "text_only": args.text_only}
    backends = {}
    api_key = os.environ.get("OPENAI_API_KEY")
    policy = RetryPolicy(args.retries, args.retry_base_delay, args.timeout)
    if need_llm:
        llm_servers = _servers(args.llm, "/v1/chat/completions")
        recipe["llm"] = {"model": args.llm_model, "prompt_version": PROMPT_VERSION,
                         "categories": list(categories)}
        backends["llm"] = {"urls": list(llm_servers.urls), "model": args.llm_model,
                           "prompt_version": PROMPT_VERSION, "system_prompt": SYSTEM_PROMPT,
                           "user_prompt": USER_PROMPT, "few_shot": [list(e) for e in FEW_SHOT],
                           "temperature": LLM_TEMPERATURE}

    backend, keep_rule, candidates = None, None, 1
    if args.t2i:
        recipe["t2i"], backends["t2i"], backend, keep_rule, candidates = _t2i_setup(
            args, api_key, share)
    workers = args.workers or 8
    # A URL that several rows share is fetched once and named after the first of them, so the
    # file is the same whichever thread, or process, fetches it.
    first_row = {}
    for item in items:
        first_row.setdefault(item.safe_image_url, item.index)

    def run(job: Job) -> None:
        mine = [item for item in items if job.share.owns(item.id)]
        if need_llm:
            llm = ChatLLM(llm_servers, args.llm_model, policy, job.stats, api_key)
            caption_phase(job, mine, llm, workers)
        maker = ImageMaker(job.out.root, backend, keep_rule, candidates, args.seed, policy,
                           job.stats, fetch=not args.text_only,
                           max_image_bytes=round(args.max_image_mb * MB), first_row=first_row)
        maker.fetched.update((r["image_url"], r["safe_image"]) for r in job.done.values()
                             if r.get("image_url") and r.get("safe_image"))
        image_phase(job, mine, maker, workers, "images" if backend else "rows")

    path = args.captions or args.from_visu or args.from_nsfwcaps
    return Plan(recipe, backends, len(items), run, str(path.resolve()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    _STOP.clear()
    share = join_job()
    dataset = job = None  # the dataset's job (rank 0) and this process's (the same, alone)
    try:
        plan = plan_toy(args) if args.toy is not None else plan_sources(args, share)
        dataset, job = open_job(args, plan, share)
        plan.run(job)
        job.finish()
        if share.world > 1:
            wait_for_every_share()
            if dataset is not None:
                dataset.finish()
    except KeyboardInterrupt:
        if job is not None:
            job.stop("interrupted")
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except (InputError, FatalError) as e:
        if job is not None:
            job.stop("stopped")
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        note = ""
        # A few bytes may still fit: the staged rows and answers, then a manifest that says the
        # run did not finish.
        try:
            if job is not None:
                job.stop("interrupted")
        except OSError:
            note = " (manifest.json still says running)"
        print(f"error: {e.filename or args.out}: no space left on device{note}; free some space, "
              f"then run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        for each in (job, dataset):
            if each is not None:
                each.out.close()
        if share.world > 1:
            import torch.distributed
            torch.distributed.destroy_process_group()
    if dataset is None:
        return 0
    rejected = (f", {len(dataset.rejected)} items rejected (see manifest.json)"
                if dataset.rejected else "")
    if dataset.not_retried():
        rejected += (f"; {dataset.not_retried()} of them by an earlier run: --retry-rejected asks "
                     f"again")
    print(f"{args.out / 'pairs.jsonl'}: {len(dataset.done)} rows{rejected}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
