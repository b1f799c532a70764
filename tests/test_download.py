"""Downloads, against a local HTTP server on 127.0.0.1 acting as OpenAI, GitHub and a mirror."""
import argparse
import ast
import hashlib
import http.server
import importlib.util
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import safeclip

MODEL = bytes(range(256)) * 1200  # 300 KiB stand-in for ViT-B-32.pt
VOCAB = b"stand-in for bpe_simple_vocab_16e6.txt.gz" * 100


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Server:
    """Serves `files` (URL path -> bytes) with Range support; records (path, Range) of each GET."""

    def __init__(self):
        self.files, self.requests = {}, []
        self.cut_after = None  # close the next response after this many body bytes
        self.stall_after = None  # stop sending (without closing) after this many body bytes
        self.ignore_range = False
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                state.requests.append((self.path, asked))
                data = state.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                start = 0
                if asked and not state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if state.cut_after is not None:
                    body, state.cut_after = body[:state.cut_after], None
                if state.stall_after is not None:
                    self.wfile.write(body[:state.stall_after])
                    self.wfile.flush()
                    return time.sleep(2)
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def publish(self, path, data):
        self.files[path] = data
        return self.url + path


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("SAFECLIP_BASE_URL", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a user's http_proxy must not catch local requests
    server = Server()
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def openai(server, monkeypatch):
    """The server holds ViT-B/32 (as MODEL) and the vocabulary (as VOCAB) where the table says."""
    model_url = server.publish(f"/clip/models/{sha256(MODEL)}/ViT-B-32.pt", MODEL)
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32", model_url)
    monkeypatch.setattr(safeclip, "VOCAB_URL", server.publish("/openai/CLIP/vocab.txt.gz", VOCAB))
    monkeypatch.setattr(safeclip, "VOCAB_SHA256", sha256(VOCAB))
    return server


def test_table_matches_the_urls_of_openai_clip():
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    source = (Path(folder) / "clip.py").read_text()
    models = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                  if isinstance(node, ast.Assign) and node.targets[0].id == "_MODELS")
    assert safeclip.OPENAI_MODELS == {name: models[name] for name in
                                      ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]}
    for url in safeclip.OPENAI_MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", url.split("/")[-2])


def test_vocabulary_hash_is_that_of_the_copy_clip_anytorch_ships():
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    data = (Path(folder) / safeclip.VOCAB_FILE).read_bytes()
    assert safeclip.VOCAB_SHA256 == sha256(data)
    assert safeclip.VOCAB_URL.endswith("/openai/CLIP/main/clip/" + safeclip.VOCAB_FILE)


def test_download_fetches_weights_and_vocabulary_with_a_progress_bar(openai, tmp_path, capsys):
    path = safeclip.download("ViT-B/32", tmp_path / "weights")
    assert path == tmp_path / "weights" / "ViT-B-32.pt"
    assert path.read_bytes() == MODEL
    assert (tmp_path / "weights" / safeclip.VOCAB_FILE).read_bytes() == VOCAB
    # Beside them, only each one's verified-hash stamp (hidden); no .part left.
    assert {p.name for p in path.parent.iterdir() if not p.name.startswith(".")} == {"ViT-B-32.pt", safeclip.VOCAB_FILE}
    bar = capsys.readouterr().err
    assert "ViT-B-32.pt" in bar and "100%" in bar and "300k/300k" in bar


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B-32", "vit-b-32.pt"])
def test_file_style_names_are_accepted(openai, tmp_path, name):
    assert safeclip.download(name, tmp_path, progress=False).read_bytes() == MODEL


def test_unknown_name_lists_the_known_ones(tmp_path):
    known = "ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px"
    with pytest.raises(ValueError, match=rf"'ViT-B/99'.*{re.escape(known)}"):
        safeclip.download("ViT-B/99", tmp_path)


def test_wrong_hash_is_refused_and_nothing_is_left_behind(openai, tmp_path):
    url = openai.publish(f"/clip/models/{sha256(MODEL)}/ViT-B-32.pt", MODEL[::-1])
    with pytest.raises(safeclip.DownloadError) as err:
        safeclip.download("ViT-B/32", tmp_path, progress=False)
    assert url in str(err.value)
    assert f"SHA-256 {sha256(MODEL[::-1])}, expected {sha256(MODEL)}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cut_download_resumes_with_a_range_request(openai, tmp_path):
    openai.cut_after = 100_000
    with pytest.raises(safeclip.DownloadError, match="after 100000 of 307200 bytes.*resume"):
        safeclip.download("ViT-B/32", tmp_path, progress=False)
    assert not (tmp_path / "ViT-B-32.pt").exists()
    assert (tmp_path / "ViT-B-32.pt.part").read_bytes() == MODEL[:100_000]

    assert safeclip.download("ViT-B/32", tmp_path, progress=False).read_bytes() == MODEL
    assert openai.requests[1] == (f"/clip/models/{sha256(MODEL)}/ViT-B-32.pt", "bytes=100000-")
    assert not (tmp_path / "ViT-B-32.pt.part").exists()


def test_server_ignoring_range_makes_the_download_start_again(openai, tmp_path, capsys):
    (tmp_path / "ViT-B-32.pt.part").write_bytes(b"x" * 1000)  # appending to these would corrupt
    openai.ignore_range = True
    assert safeclip.download("ViT-B/32", tmp_path).read_bytes() == MODEL
    assert openai.requests[0][1] == "bytes=1000-"
    assert "ignored the request to resume" in capsys.readouterr().err


def test_complete_part_file_answered_416_is_verified_and_used(openai, tmp_path):
    (tmp_path / "ViT-B-32.pt.part").write_bytes(MODEL)
    assert safeclip.download("ViT-B/32", tmp_path, progress=False).read_bytes() == MODEL
    assert openai.requests[0][1] == f"bytes={len(MODEL)}-"


def test_overlong_part_file_answered_416_is_refused_and_deleted(openai, tmp_path):
    (tmp_path / "ViT-B-32.pt.part").write_bytes(MODEL + b"junk")
    with pytest.raises(safeclip.DownloadError, match="SHA-256"):
        safeclip.download("ViT-B/32", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_404_names_the_url_and_what_to_do(openai, tmp_path):
    del openai.files[f"/clip/models/{sha256(MODEL)}/ViT-B-32.pt"]
    with pytest.raises(safeclip.DownloadError) as err:
        safeclip.download("ViT-B/32", tmp_path, progress=False)
    message = str(err.value)
    assert safeclip.OPENAI_MODELS["ViT-B/32"] in message and "HTTP 404" in message
    assert "--base-url" in message and str(tmp_path / "ViT-B-32.pt") in message
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_names_the_url(openai, tmp_path, monkeypatch):
    with socket.socket() as sock:  # bound but not listening, and kept: no one else can take the port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}/clip/models/{sha256(MODEL)}/ViT-B-32.pt"
        monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32", url)
        with pytest.raises(safeclip.DownloadError, match=f"cannot reach {re.escape(url)}.*network"):
            safeclip.download("ViT-B/32", tmp_path, progress=False)


def test_stalled_server_times_out_and_keeps_the_part_file(openai, tmp_path, monkeypatch):
    monkeypatch.setattr(safeclip, "DOWNLOAD_TIMEOUT", 0.5)
    openai.stall_after = 50_000
    with pytest.raises(safeclip.DownloadError, match="after 50000 of 307200 bytes .timed out"):
        safeclip.download("ViT-B/32", tmp_path, progress=False)
    assert (tmp_path / "ViT-B-32.pt.part").read_bytes() == MODEL[:50_000]


def test_present_and_verified_files_are_not_requested(openai, tmp_path, capsys):
    (tmp_path / "ViT-B-32.pt").write_bytes(MODEL)
    (tmp_path / safeclip.VOCAB_FILE).write_bytes(VOCAB)
    assert safeclip.download("ViT-B/32", tmp_path) == tmp_path / "ViT-B-32.pt"
    assert openai.requests == []
    assert capsys.readouterr().err.count("already present and verified: nothing to download") == 2


def test_present_but_wrong_file_is_replaced(openai, tmp_path):
    (tmp_path / "ViT-B-32.pt").write_bytes(MODEL[:-1])
    assert safeclip.download("ViT-B/32", tmp_path, progress=False).read_bytes() == MODEL


def test_progress_false_prints_nothing(openai, tmp_path, capsys):
    safeclip.download("ViT-B/32", tmp_path, progress=False)
    safeclip.download("ViT-B/32", tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_mirror_serves_openai_layout_and_the_vocabulary(server, tmp_path, monkeypatch, given):
    unreachable = f"https://openai.invalid/clip/models/{sha256(MODEL)}/ViT-B-32.pt"
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32", unreachable)
    monkeypatch.setattr(safeclip, "VOCAB_SHA256", sha256(VOCAB))
    server.publish(f"/mirror/{sha256(MODEL)}/ViT-B-32.pt", MODEL)
    server.publish(f"/mirror/{safeclip.VOCAB_FILE}", VOCAB)
    base_url = server.url + "/mirror/"  # a trailing slash is fine
    if given == "environment":
        monkeypatch.setenv("SAFECLIP_BASE_URL", base_url)
    path = safeclip.download("ViT-B/32", tmp_path, base_url if given == "argument" else None,
                             progress=False)
    assert path.read_bytes() == MODEL and (tmp_path / safeclip.VOCAB_FILE).read_bytes() == VOCAB
    assert [p for p, _ in server.requests] == [f"/mirror/{sha256(MODEL)}/ViT-B-32.pt",
                                               f"/mirror/{safeclip.VOCAB_FILE}"]


def test_mirror_does_not_refetch_a_verified_vocabulary(server, tmp_path, monkeypatch):
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32",
                        f"https://openai.invalid/clip/models/{sha256(MODEL)}/ViT-B-32.pt")
    monkeypatch.setattr(safeclip, "VOCAB_SHA256", sha256(VOCAB))
    server.publish(f"/mirror/{sha256(MODEL)}/ViT-B-32.pt", MODEL)
    (tmp_path / safeclip.VOCAB_FILE).write_bytes(VOCAB)
    safeclip.download("ViT-B/32", tmp_path, server.url + "/mirror", progress=False)
    assert [p for p, _ in server.requests] == [f"/mirror/{sha256(MODEL)}/ViT-B-32.pt"]


def parser():
    parser = argparse.ArgumentParser(prog="safeclip.py")
    safeclip.add_download_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_download_subcommand(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32",
                        f"https://openai.invalid/clip/models/{sha256(MODEL)}/ViT-B-32.pt")
    monkeypatch.setattr(safeclip, "VOCAB_SHA256", sha256(VOCAB))
    server.publish(f"/m/{sha256(MODEL)}/ViT-B-32.pt", MODEL)
    server.publish(f"/m/{safeclip.VOCAB_FILE}", VOCAB)
    args = parser().parse_args(["download", "ViT-B-32", "--dir", str(tmp_path / "w"),
                                "--base-url", server.url + "/m"])
    args.func(args)
    assert (tmp_path / "w" / "ViT-B-32.pt").read_bytes() == MODEL
    assert capsys.readouterr().out == f"{tmp_path / 'w' / 'ViT-B-32.pt'}\n"


def test_cli_defaults_to_the_weights_folder(monkeypatch):
    args = parser().parse_args(["download", "ViT-L/14"])
    assert (args.name, args.dir, args.base_url) == ("ViT-L/14", None, None)
    monkeypatch.delenv("SAFECLIP_WEIGHTS", raising=False)
    assert safeclip.weights_folder() == Path(safeclip.__file__).resolve().parent / "weights"  # beside safeclip.py
    monkeypatch.setenv("SAFECLIP_WEIGHTS", "/data/clip")
    assert safeclip.weights_folder() == Path("/data/clip")


def test_cli_help_lists_models_and_mirror_layout(capsys):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(["download", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name, file in [("ViT-B/32", "ViT-B-32.pt"), ("ViT-B/16", "ViT-B-16.pt"),
                       ("ViT-L/14", "ViT-L-14.pt"), ("ViT-L/14@336px", "ViT-L-14-336px.pt")]:
        assert re.search(rf"^  {re.escape(name)} +{re.escape(file)}$", text, re.M)
    assert "--base-url URL" in text and "SAFECLIP_BASE_URL" in text and "URL/<sha256>/" in text


@pytest.mark.parametrize("name, message", [("ViT-B/32", "error: http://127.0.0.1:.* HTTP 404"),
                                           ("ViT-X", "error: unknown model 'ViT-X'")])
def test_cli_errors_exit_with_the_message(openai, tmp_path, name, message):
    del openai.files[f"/clip/models/{sha256(MODEL)}/ViT-B-32.pt"]
    args = parser().parse_args(["download", name, "--dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        args.func(args)
    assert re.match(message, stop.value.code)
