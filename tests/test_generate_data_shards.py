"""generate_data.py on many processes and many servers, with every reply bounded (issue 35).

Under torchrun each process makes its share of the items and rank 0 assembles the dataset once all
are done; several servers of a kind share the requests, and one that dies is dropped; an endless
reply costs bounded memory. The processes draw with a stand-in for diffusers that takes a fixed
time per image (the tiny Stable Diffusion of test_generate_data.py would spend most of each test
importing transformers and diffusers in every process); the servers are the scripted stub of
test_generate_data.py and, for endless replies, one of its own, all on 127.0.0.1.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_generate_data import (FAST, ROOT, Stub, manifest, ok_answer, png_bytes, rows, run,
                                write_jsonl)
from test_untrusted_generate_data import PEAK_MEMORY

MB = 1 << 20
SECONDS_PER_IMAGE = 0.15

# ---------------------------------------------------------------------------------------------
# Many processes under torchrun, drawing with a stand-in pipeline
# ---------------------------------------------------------------------------------------------

STAND_IN = '''
"""A stand-in for diffusers: a pipeline that takes STAND_IN_SECONDS_PER_IMAGE per image and draws
each image from its prompt and its generator's seed, so that a seed gives the same bytes in any
process. It notes each call in STAND_IN_LOG and its process id in STAND_IN_PIDS/RANK."""
import hashlib
import os
import time
import types

from PIL import Image


class Pipeline:
    def to(self, device):
        return self

    def set_progress_bar_config(self, **options):
        pass

    def __call__(self, prompt, num_images_per_prompt, generator, height, width, **options):
        time.sleep(float(os.environ["STAND_IN_SECONDS_PER_IMAGE"]) * num_images_per_prompt)
        with open(os.environ["STAND_IN_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')}\\t{prompt}\\n")
        images = []
        for g in generator:
            colour = hashlib.sha256(f"{prompt}|{g.initial_seed()}".encode()).digest()
            image = Image.new("RGB", (width, height), tuple(colour[:3]))
            image.putpixel((1, 1), tuple(colour[3:6]))
            images.append(image)
        return types.SimpleNamespace(images=images)


class AutoPipelineForText2Image:
    @staticmethod
    def from_pretrained(model_id, torch_dtype=None):
        folder = os.environ["STAND_IN_PIDS"]
        with open(os.path.join(folder, os.environ.get("RANK", "0")), "w") as f:
            f.write(str(os.getpid()))
        return Pipeline()
'''

ITEMS = 24  # 48 images: ~7 s for one process


class Generation:
    """One generate_data.py command (one process, or torchrun's) on the stand-in pipeline."""

    def __init__(self, tmp, out, processes, seconds_per_image=SECONDS_PER_IMAGE):
        self.out, self.log, self.pids = out, tmp / f"{out.name}-drawn.log", tmp / f"{out.name}-pids"
        self.pids.mkdir()
        package = tmp / "stand-in" / "diffusers"
        if not package.exists():
            package.mkdir(parents=True)
            (package / "__init__.py").write_text(STAND_IN)
        source = tmp / "captions.jsonl"
        if not source.exists():
            write_jsonl(source, [{"caption": f"a kite number {k} over a beach",
                                  "unsafe": f"a kite number {k} over a burning beach"}
                                 for k in range(ITEMS)])
        args = ["--captions", source, "--t2i", "diffusers:stand-in", "--image-size", 16,
                "--workers", 2, "--out", out]
        self.script = [str(ROOT / "generate_data.py"), *map(str, args)]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes)] if processes > 1 else []  # torchrun
        self.command = [sys.executable, *launcher, *self.script]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                        [str(tmp / "stand-in"), os.environ.get("PYTHONPATH", "")]),
                    "STAND_IN_SECONDS_PER_IMAGE": str(seconds_per_image),
                    "STAND_IN_LOG": str(self.log), "STAND_IN_PIDS": str(self.pids),
                    "OMP_NUM_THREADS": "1"}

    def start(self):
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        return self.process

    def run(self):
        began = time.monotonic()
        self.start()
        _, err = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, err
        return time.monotonic() - began

    def drawn(self):
        """(rank, prompt) of every image drawn so far."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [tuple(line.split("\t")) for line in lines]


def files(folder):
    """Every file of a dataset folder by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def drawing_time(folder):
    """Seconds from the first image written to the last."""
    times = [p.stat().st_mtime for p in (folder / "images").rglob("*.png")]
    return max(times) - min(times)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    generation = Generation(tmp, tmp / "one", 1)
    generation.wall = generation.run()
    return generation


def test_two_processes_under_torchrun_make_the_same_dataset_as_one_in_half_the_time(one_process):
    two = Generation(one_process.out.parent, one_process.out.parent / "two", 2)
    wall = two.run()
    assert files(two.out) == files(one_process.out)  # rows, images and manifest, byte for byte
    assert not (two.out / "shards").exists()
    assert manifest(two.out)["status"] == "complete" and len(rows(two.out)) == ITEMS
    drawn = two.drawn()
    assert Counter(prompt for _, prompt in drawn) == Counter(p for _, p in one_process.drawn())
    assert Counter(rank for rank, _ in drawn) == {"0": ITEMS, "1": ITEMS}  # half each
    one, both = drawing_time(one_process.out), drawing_time(two.out)
    print(f"\n{ITEMS} items, {2 * ITEMS} images at {SECONDS_PER_IMAGE} s: drawing {one:.1f} s in one "
          f"process, {both:.1f} s in two; the whole command {one_process.wall:.1f} s and {wall:.1f} s")
    assert both < 0.65 * one


def test_a_process_killed_midway_and_the_command_run_again_resume_every_share(one_process):
    # Slower images (~10 s a share), so that the job still runs after another command has
    # started and been refused.
    killed = Generation(one_process.out.parent, one_process.out.parent / "killed", 2, 0.4)
    job = killed.start()
    share = killed.out / "shards" / "1" / "pairs.jsonl"

    def wait_for(condition):
        deadline = time.monotonic() + 60
        while job.poll() is None and not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    wait_for(share.parent.exists)  # the job has the folder
    # It admits that one job: another command on the same folder is refused meanwhile.
    other = subprocess.run([sys.executable, *killed.script], env=killed.env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 1 and "in use by another generate_data.py run" in other.stderr
    wait_for(lambda: share.exists() and share.read_bytes().count(b"\n") >= ITEMS // 4)
    assert job.poll() is None, "the job ended before a process could be killed"
    os.kill(int((killed.pids / "1").read_text()), signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode != 0
    committed = [json.loads(line) for shard in (killed.out / "shards").glob("*/pairs.jsonl")
                 for line in shard.read_text().splitlines()]
    assert 3 <= len(committed) < ITEMS
    mark = len(killed.drawn())

    killed.run()  # the same command
    resumed, clean = files(killed.out), files(one_process.out)
    # The same files, but for the request counts in the manifest: those of the killed process
    # since it last wrote its manifest are lost, and the items it had in flight were asked twice.
    manifests = [json.loads(folder.pop("manifest.json")) for folder in (resumed, clean)]
    assert resumed == clean
    assert manifests[0] | {"requests": None} == manifests[1] | {"requests": None}
    again = {prompt for _, prompt in killed.drawn()[mark:]}
    assert not again & {r[key] for r in committed for key in ("safe", "unsafe")}  # none twice
    assert len(again) <= 2 * (ITEMS - len(committed))


# ---------------------------------------------------------------------------------------------
# Several servers per kind
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_stubs():
    stubs = [Stub(), Stub()]
    for stub in stubs:
        stub.thread.start()
    yield stubs
    for stub in stubs:
        stub.closing.set()
        stub.server.shutdown()
        stub.server.server_close()


def test_requests_spread_over_servers_and_one_that_dies_is_dropped(two_stubs, tmp_path, capsys):
    a, b = two_stubs
    a.latency = b.latency = 0.01
    captions = [f"a yellow tram number {k}" for k in range(30)]
    source = tmp_path / "captions.txt"
    source.write_text("".join(c + "\n" for c in captions))

    def kill_a():  # once it has served ten requests: new ones find no one listening
        deadline = time.monotonic() + 30
        while len(a.log) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        a.server.shutdown()
        a.server.server_close()

    killer = threading.Thread(target=kill_a, daemon=True)
    killer.start()
    out = tmp_path / "out"
    assert run("--captions", source, "--llm", f"{a.url},{b.url}/v1", "--llm-model", "stub",
               "--t2i", f"{a.url}/v1,{b.url}", "--image-size", 8, "--workers", 4, "--out", out,
               *FAST) == 0
    killer.join()
    assert [r["safe"] for r in rows(out)] == captions  # every item, once, in order
    answered = Counter(key for stub in (a, b) for _, kind, key, behaviour, _ in stub.log
                       if behaviour == "ok")
    asked = {c for c in captions} | {ok_answer(r["safe"], r["category"]) for r in rows(out)}
    assert answered == {key: 2 if key in captions else 1 for key in asked}  # none twice
    assert 10 <= len(a.log) < len(b.log)
    # Killed during the captions; by the images, it has failed five times in a row for sure.
    assert f"note: dropping {a.url}/v1/images/generations" in capsys.readouterr().err


def test_a_server_list_with_a_bad_url_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("--captions", tmp_path / "c.txt", "--llm", "http://a:8000,b:8000", "--llm-model", "m",
            "--text-only", "--out", tmp_path / "o")
    assert "--llm b:8000: expected a URL starting with http://" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bounded replies
# ---------------------------------------------------------------------------------------------


class Endless:
    """Chat completions and image generations that answer normally, except for a caption or a
    prompt with "endless" in it: then a reply of no stated length that goes on until the client
    stops reading (or 400 MB)."""

    def __init__(self):
        self.sent = Counter()
        endless = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/chat/completions"):
                    text = request["messages"][-1]["content"]
                    caption = text.split("Caption: ")[1]
                    category = text.split("Category: ")[1].split("\n")[0]
                    body = {"choices": [{"message": {"content": ok_answer(caption, category)},
                                         "finish_reason": "stop"}]}
                    start, key = b'{"choices": [{"message": {"content": "', caption
                else:
                    image = base64.b64encode(png_bytes((9, 9, 9))).decode()
                    body = {"data": [{"b64_json": image}] * request["n"]}
                    start, key = b'{"data": [{"b64_json": "', request["prompt"]
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if "endless" not in key:
                        data = json.dumps(body).encode()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    self.end_headers()
                    self.wfile.write(start)
                    chunk = b"x" * MB
                    while endless.sent[key] < 400 * MB:
                        self.wfile.write(chunk)
                        endless.sent[key] += MB
                except OSError:  # the client stopped reading
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def peak_memory(*args):
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY, sys.executable,
                           str(ROOT / "generate_data.py"), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    return done.returncode, int(done.stdout), done.stderr


def test_an_endless_reply_costs_bounded_memory_and_its_item_is_given_up(tmp_path):
    server = Endless()
    threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        source = write_jsonl(tmp_path / "c.jsonl", [
            {"caption": "a cat on a mat"},                      # answered, then drawn
            {"caption": "an endless road"},                     # the LLM's reply never ends
            {"caption": "a dog", "unsafe": "an endless dog"}])  # nor the images server's
        out = tmp_path / "out"
        _, at_start, _ = peak_memory("--help")
        rc, peak, err = peak_memory("--captions", source, "--llm", server.url, "--llm-model", "m",
                                    "--t2i", server.url, "--max-image-mb", 1, "--image-size", 8,
                                    "--retries", 1, "--out", out, *FAST[:2], "--timeout", 30)
    finally:
        server.server.shutdown()
        server.server.server_close()
    assert rc == 0, err
    print(f"\npeak memory {peak / MB:.0f} MB, {(peak - at_start) / MB:.0f} MB above a process "
          f"that only starts; the server sent {dict(server.sent)} bytes")
    assert peak - at_start < 200 * MB
    assert [r["safe"] for r in rows(out)] == ["a cat on a mat"]
    assert {(r["safe"], r["stage"], r["reason"]) for r in manifest(out)["rejected"]} == {
        ("an endless road", "llm", "too_large"), ("a dog", "t2i", "too_large")}
    assert manifest(out)["requests"]["llm"]["too_large"] == 2  # retried once, then given up
    assert all(sent < 20 * MB for sent in server.sent.values())  # the client stopped reading
