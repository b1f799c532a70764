"""generate_data.py on dataset files from the internet (issue 27): what a row's URL, its image or
its text may hold costs bounded memory and time, and rejects that row, never the run.

Every input is built here: the URLs point to a small web server on 127.0.0.1 that serves pages,
redirects and lazily generated streams, and an "FTP server" that only counts who connects and
then says nothing useful, one byte at a time.
"""

import io
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import generate_data as gd
from test_generate_data import FAST, ROOT, manifest, png_bytes, rows, run, stub, write_lines

__all__ = ["stub"]  # the fixture, imported for the tests below

MB = 1 << 20


# ---------------------------------------------------------------------------------------------
# The servers and the inputs
# ---------------------------------------------------------------------------------------------


class Web:
    """GET only. routes: path -> ("bytes", body, type) | ("redirect", location) |
    ("status", code) | ("stream", claimed Content-Length or None, bytes to send at most)."""

    def __init__(self):
        self.routes, self.log, self.sent = {}, [], {}
        web = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                web.log.append(self.path)
                kind, *spec = web.routes.get(self.path, ("status", 404))
                try:
                    if kind == "bytes":
                        self.head(200, {"Content-Type": spec[1], "Content-Length": len(spec[0])})
                        self.wfile.write(spec[0])
                    elif kind == "redirect":
                        self.head(302, {"Location": spec[0], "Content-Length": 0})
                    elif kind == "status":
                        self.head(spec[0], {"Content-Length": 0})
                    else:  # a stream, made a megabyte at a time: the server holds none of it
                        claimed, total = spec
                        self.head(200, {"Content-Type": "image/png"} | (
                            {"Content-Length": claimed} if claimed else {}))
                        chunk = bytes(MB)
                        for _ in range(total // MB):
                            self.wfile.write(chunk)
                            web.sent[self.path] = web.sent.get(self.path, 0) + MB
                except OSError:  # the client stopped reading
                    pass

            def head(self, code, headers):
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, str(value))
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def web():
    server = Web()
    thread = threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


class Ftp:
    """A port that counts the connections it accepts and never greets them; with `trickle`, it
    sends a byte every half second, never a whole line, so a client waiting for its greeting
    with a timeout on each read waits for ever."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)  # to see `closing`
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.trickle_bytes = False
        self.closing = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.closing.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.trickle, args=(connection,), daemon=True).start()

    def trickle(self, connection):
        with connection:
            while not self.closing.wait(0.5):
                if not self.trickle_bytes:
                    continue
                try:
                    connection.sendall(b"2")
                except OSError:
                    return


@pytest.fixture
def ftp():
    server = Ftp()
    yield server
    server.closing.set()
    server.socket.close()


# Runs the command in its arguments and prints its peak resident memory in bytes. A child's
# ru_maxrss starts from the peak of the process it was forked from (this one holds torch): the
# launcher is a small Python, so what it reports is the command's own.
PEAK_MEMORY = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss * 1024); "
               "sys.exit(os.waitstatus_to_exitcode(status))")


def bomb_png(width, height):
    """A PNG of a few dozen bytes whose header claims width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def noise_png(size, seed=0):
    """A PNG of random pixels (it does not compress): about 3 * size**2 bytes."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(3 * size * size)).save(buffer, "PNG")
    return buffer.getvalue()


def nsfwcaps(path, urls):
    """An NSFWCaps file with one row per URL."""
    path.write_text("".join(json.dumps({"image_coco_url": url, "caption": f"a photo {k}",
                                        "nsfw_caption": f"an unsafe photo {k}",
                                        "chosen_category": "violence"}) + "\n"
                            for k, url in enumerate(urls)))
    return path


def rejected(out, urls):
    """{a row's URL: the reason it was rejected}, from rejected.jsonl (what a resume reads)."""
    url_of = {f"a photo {k}": url for k, url in enumerate(urls)}
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {url_of[r["safe"]]: r["reason"] for r in map(json.loads, lines)}


def fetch(tmp_path, urls, *flags, name="out"):
    """Run --from-nsfwcaps over rows with these URLs; returns (exit code, out folder)."""
    out = tmp_path / name
    source = nsfwcaps(tmp_path / f"{name}.jsonl", urls)
    return run("--from-nsfwcaps", source, "--out", out, *FAST, *flags), out


# ---------------------------------------------------------------------------------------------
# URLs: http(s) only, redirects included
# ---------------------------------------------------------------------------------------------


def test_a_file_or_ftp_url_in_a_dataset_rejects_its_row_and_reads_nothing(web, ftp, tmp_path):
    photo = tmp_path / "private" / "photo.png"
    photo.parent.mkdir()
    photo.write_bytes(png_bytes((9, 9, 9)))
    web.routes["/a.png"] = ("bytes", png_bytes((1, 2, 3)), "image/png")
    urls = [photo.as_uri(), f"ftp://127.0.0.1:{ftp.port}/x.png", f"{web.url}/a.png"]
    rc, out = fetch(tmp_path, urls)
    assert rc == 0
    assert [(out / r["safe_image"]).read_bytes() for r in rows(out)] == [png_bytes((1, 2, 3))]
    assert rejected(out, urls) == {urls[0]: "bad_url", urls[1]: "bad_url"}
    assert ftp.connections == 0
    assert [p.read_bytes() for p in (out / "images").rglob("*.*")] == [png_bytes((1, 2, 3))]


def test_a_redirect_to_ftp_is_refused_before_any_connection(web, ftp, tmp_path):
    ftp.trickle_bytes = True
    web.routes["/moved.png"] = ("redirect", f"ftp://127.0.0.1:{ftp.port}/x.png")
    web.routes["/to-file.png"] = ("redirect", (tmp_path / "out.jsonl").as_uri())
    out = tmp_path / "out"
    urls = [f"{web.url}/moved.png", f"{web.url}/to-file.png"]
    source = nsfwcaps(tmp_path / "out.jsonl", urls)
    # A child process, so that a run that follows the redirect (and waits for the FTP server's
    # greeting for ever: --timeout does not cover FTP) fails this test instead of hanging it.
    done = subprocess.run([sys.executable, str(ROOT / "generate_data.py"), "--from-nsfwcaps", str(source),
                           "--out", str(out), "--timeout", "5", "--retries", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert rejected(out, urls) == {urls[0]: "bad_redirect", urls[1]: "bad_redirect"}
    assert ftp.connections == 0


# ---------------------------------------------------------------------------------------------
# Sizes: a cap on bytes and on pixels
# ---------------------------------------------------------------------------------------------


def test_a_huge_download_stops_at_the_size_cap_in_bounded_memory(web, tmp_path):
    web.routes["/says-300mb.png"] = ("stream", 300 * MB, 300 * MB)  # and would send them
    web.routes["/endless.png"] = ("stream", None, 300 * MB)  # no length: 300 MB unless stopped
    web.routes["/a.png"] = ("bytes", png_bytes((1, 2, 3)), "image/png")
    out = tmp_path / "out"
    urls = [f"{web.url}/a.png", f"{web.url}/says-300mb.png", f"{web.url}/endless.png"]
    source = nsfwcaps(tmp_path / "out.jsonl", urls)
    # The default cap (50 MB), against the run's peak resident memory.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        done = subprocess.run([sys.executable, "-c", PEAK_MEMORY, sys.executable, str(ROOT / "generate_data.py"),
                               "--from-nsfwcaps", str(source), "--out", str(out), "--retries", "0",
                               "--workers", "1"], stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)
    assert done.returncode == 0, (tmp_path / "stderr.txt").read_text()
    assert int(done.stdout) < 150 * MB  # Python, Pillow and tqdm take ~35 MB; the cap 50
    assert [r["image_url"] for r in rows(out)] == urls[:1]
    assert rejected(out, urls) == {urls[1]: "too_large", urls[2]: "too_large"}
    assert web.sent.get("/endless.png", 0) < 100 * MB  # the client stopped reading


def test_max_image_mb_sets_the_cap(web, tmp_path, capsys):
    big, small = noise_png(100), png_bytes((1, 2, 3))  # ~30 KB and ~70 bytes
    web.routes |= {"/big.png": ("bytes", big, "image/png"), "/small.png": ("bytes", small, "image/png"),
                   "/big-stream.png": ("stream", None, 2 * MB)}
    urls = [f"{web.url}/big.png", f"{web.url}/small.png", f"{web.url}/big-stream.png"]
    rc, out = fetch(tmp_path, urls, "--max-image-mb", "0.01")
    assert rc == 0
    assert [(out / r["safe_image"]).read_bytes() for r in rows(out)] == [small]
    assert rejected(out, urls) == {urls[0]: "too_large", urls[2]: "too_large"}
    with pytest.raises(SystemExit) as exit_:
        run("--from-nsfwcaps", tmp_path / "out.jsonl", "--out", tmp_path / "other", "--max-image-mb", "0")
    assert exit_.value.code == 2 and "--max-image-mb must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gd.main(["--help"])
    assert "--max-image-mb" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_rejects_its_row_and_the_run_goes_on(web, tmp_path):
    web.routes |= {"/a.png": ("bytes", png_bytes((1, 2, 3)), "image/png"),
                   "/bomb.png": ("bytes", bomb_png(20000, 20000), "image/png"),   # PIL raises
                   "/large.png": ("bytes", bomb_png(10000, 10000), "image/png"),  # PIL warns
                   "/b.png": ("bytes", png_bytes((4, 5, 6)), "image/png")}
    urls = [f"{web.url}/{name}.png" for name in ("a", "bomb", "large", "b")]
    assert len(bomb_png(20000, 20000)) < 140
    rc, out = fetch(tmp_path, urls, "--workers", "1")
    assert rc == 0
    assert [(out / r["safe_image"]).read_bytes() for r in rows(out)] == [png_bytes((1, 2, 3)),
                                                                         png_bytes((4, 5, 6))]
    assert rejected(out, urls) == {urls[1]: "too_many_pixels", urls[2]: "too_many_pixels"}
    asked = len(web.log)
    assert fetch(tmp_path, urls, "--workers", "1")[0] == 0  # a resume asks for nothing
    assert len(web.log) == asked


# ---------------------------------------------------------------------------------------------
# Dead links are the row's problem; a dead server is the run's
# ---------------------------------------------------------------------------------------------


def test_dead_links_never_stop_the_run_and_stay_rejected_on_resume(web, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gd, "MAX_REJECTED_IN_A_ROW", 3)
    page = b"<html><body>This image is no longer available</body></html>"
    urls = [f"{web.url}/gone/{k}" for k in range(5)] + [f"{web.url}/a.png"]
    web.routes = {f"/gone/{k}": ("bytes", page, "text/html") for k in range(5)}
    web.routes["/a.png"] = ("bytes", png_bytes((1, 2, 3)), "image/png")
    rc, out = fetch(tmp_path, urls, "--workers", "1")
    assert rc == 0
    assert [r["image_url"] for r in rows(out)] == urls[-1:]
    assert rejected(out, urls) == {url: "bad_image" for url in urls[:5]}
    assert len(web.log) == 6  # a page that is no image is not asked for again
    assert fetch(tmp_path, urls, "--workers", "1")[0] == 0
    assert len(web.log) == 6  # nor on resume
    # Server errors in a row still stop the run: they say the server is down.
    web.routes = {f"/down/{k}": ("status", 500) for k in range(5)}
    rc, out = fetch(tmp_path, [f"{web.url}/down/{k}" for k in range(5)], "--workers", "1",
                    "--retries", "0", name="down")
    assert rc == 1
    assert "3 items in a row were rejected (last: http_500)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Text: bounded before any regex
# ---------------------------------------------------------------------------------------------


def quick(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    assert time.monotonic() - start < 1.0, f"{fn.__name__} took {time.monotonic() - start:.1f} s"
    return result


def test_answer_checks_take_no_longer_on_huge_text():
    for n in (20_000, 1_000_000):  # 20,000 took 3.7 s with a quadratic regex; 10**6, hours
        assert quick(gd.check_answer, "A dog, bleeding.", "." * n) is None
        assert quick(gd.check_answer, "." * n + " A dog.", "A dog.") == "too_long"
        assert quick(gd.check_answer, "A dog. " * (n // 7), "A dog." * (n // 6)) == "too_long"


def test_a_flood_of_reasoning_tags_is_rejected_at_once(stub, tmp_path):
    dots, cat = "." * 20_000, "A cat on a mat."
    stub.script = {cat: [{"content": "<think>" * 20_000}]}
    source = write_lines(tmp_path / "c.txt", [dots, cat])
    out = tmp_path / "out"
    start = time.monotonic()
    assert run("--captions", source, "--llm", stub.url, "--llm-model", "stub", "--text-only",
               "--retries", "0", "--out", out, *FAST) == 0
    assert time.monotonic() - start < 5  # 10 s for the answer and 3.7 s for the caption before
    assert [r["safe"] for r in rows(out)] == [dots]
    assert [(r["safe"], r["reason"]) for r in manifest(out)["rejected"]] == [(cat, "invalid_too_long")]


# ---------------------------------------------------------------------------------------------
# Malformed files: one line naming the file and the line or key
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
VISU_ROW = {"safe": "a cat", "nsfw": "a dead cat", "tag": "violence", "coco_id": 9}


@pytest.mark.parametrize("name, text, message", [
    ("deep.json", DEEP, r"deep\.json: not valid JSON \(nested too deeply"),
    ("deep.jsonl", json.dumps(VISU_ROW) + "\n" + DEEP + "\n", r"deep\.jsonl:2: not valid JSON \(nested too deeply"),
    ("deep-object.json", '{"data": ' + DEEP + "}", r"deep-object\.json:1: not valid JSON \(nested too deeply"),
    ("infinite.jsonl", json.dumps(VISU_ROW).replace("9", "Infinity"),
     r"infinite\.jsonl:1: coco_id inf is not a number"),
    ("huge.jsonl", json.dumps(VISU_ROW).replace("9", "1e400"), r"huge\.jsonl:1: coco_id inf is not a number"),
])
def test_malformed_files_stop_with_one_line_naming_the_place(tmp_path, capsys, name, text, message):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "coco" / "train2017" / "000000000009.jpg")
    (tmp_path / name).write_text(text)
    assert run("--from-visu", tmp_path / name, "--coco-root", tmp_path / "coco", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_rows_keyed_by_ids_that_are_not_numbers_are_read_in_file_order(tmp_path):
    # "²".isdigit() is True, but int("²") fails: such a key is an id, not a number.
    keyed = {"1": VISU_ROW | {"safe": "a dog"}, "\u00b2": VISU_ROW, "0": VISU_ROW | {"safe": "a cow"}}
    (tmp_path / "keyed.json").write_text(json.dumps(keyed))
    assert run("--from-visu", tmp_path / "keyed.json", "--text-only", "--out", tmp_path / "out") == 0
    assert [r["safe"] for r in rows(tmp_path / "out")] == ["a dog", "a cat", "a cow"]


def test_a_url_that_does_not_parse_is_named_when_its_file_name_is_looked_up(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "0042.jpg")
    source = nsfwcaps(tmp_path / "n.jsonl", ["https://example.org/0042.jpg", "http://[::1/x.png"])
    assert run("--from-nsfwcaps", source, "--image-dir", tmp_path / "images", "--text-only",
               "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "n.jsonl:2: 'http://[::1/x.png' is not a URL" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# All of it at once
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_dataset_mixing_every_bad_kind_of_row_keeps_exactly_the_good_ones(web, ftp, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes((9, 9, 9)))
    good = {"/good/1.png": png_bytes((1, 2, 3)), "/good/2.png": png_bytes((4, 5, 6))}
    web.routes = {path: ("bytes", body, "image/png") for path, body in good.items()} | {
        "/page": ("bytes", b"<html>moved</html>", "text/html"),
        "/bomb.png": ("bytes", bomb_png(20000, 20000), "image/png"),
        "/large.png": ("bytes", bomb_png(10000, 10000), "image/png"),
        "/says-300mb.png": ("stream", 300 * MB, 300 * MB),
        "/endless.png": ("stream", None, 300 * MB),
        "/to-ftp": ("redirect", f"ftp://127.0.0.1:{ftp.port}/x.png"),
        "/to-file": ("redirect", photo.as_uri()),
        "/to-good": ("redirect", "/good/2.png"),  # an http redirect is followed
    }
    bad = {photo.as_uri(): "bad_url", f"ftp://127.0.0.1:{ftp.port}/x.png": "bad_url",
           "http://[::1/x.png": "bad_url", "gopher://127.0.0.1/x.png": "bad_url",
           f"{web.url}/to-ftp": "bad_redirect", f"{web.url}/to-file": "bad_redirect",
           f"{web.url}/page": "bad_image", f"{web.url}/bomb.png": "too_many_pixels",
           f"{web.url}/large.png": "too_many_pixels", f"{web.url}/says-300mb.png": "too_large",
           f"{web.url}/endless.png": "too_large", f"{web.url}/missing.png": "http_404"}
    urls = [f"{web.url}/good/1.png", *bad, f"{web.url}/to-good"]
    flags = ("--max-image-mb", "1", "--workers", "4")
    rc, out = fetch(tmp_path, urls, *flags)
    assert rc == 0
    first = (out / "pairs.jsonl").read_bytes()
    assert [(r["image_url"], (out / r["safe_image"]).read_bytes()) for r in rows(out)] == [
        (urls[0], good["/good/1.png"]), (urls[-1], good["/good/2.png"])]
    assert rejected(out, urls) == bad
    assert manifest(out)["status"] == "complete"
    assert ftp.connections == 0
    assert sorted(p.read_bytes() for p in (out / "images").rglob("*.*")) == sorted(good.values())
    asked = len(web.log)
    assert fetch(tmp_path, urls, *flags)[0] == 0
    assert len(web.log) == asked  # the second run asks for nothing
    assert (out / "pairs.jsonl").read_bytes() == first
