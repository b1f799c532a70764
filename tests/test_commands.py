"""The commands exactly as users type them: models by name, `train --data pairs.jsonl` alone,
`evaluate.py --ckpt DIR` alone, and the help.

The commands run as subprocesses in a temporary working copy of the repository (safeclip.py,
evaluate.py, an empty weights/, a pairs.jsonl), from its root and from another folder. OpenAI is
played by a mirror on 127.0.0.1 (SAFECLIP_BASE_URL, a production setting) serving a tiny
random-weight CLIP in OpenAI's state-dict layout under the real file name, ViT-L-14.pt, and
OpenAI's real vocabulary; SAFECLIP_MODELS (a production setting too: a table of models by name)
gives the stand-in's URL with its hash.
"""

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clip_package_dir, make_pairs, run_killed_after_step

import evaluate as ev
import safeclip

VOCAB = (clip_package_dir() / safeclip.VOCAB_FILE).read_bytes()


def openai_layout_weights(openai_model, seed):
    """The bytes of a tiny CLIP built and initialised by OpenAI's own clip/model.py, saved as a
    plain state dict (OpenAI's names and shapes, as its `.pt` files hold them)."""
    torch.manual_seed(seed)
    model = openai_model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                              vision_patch_size=8, context_length=77, vocab_size=49408,
                              transformer_width=64, transformer_heads=1, transformer_layers=2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


class Mirror:
    """A mirror laid out like OpenAI's: /<sha256>/<file>.pt and /bpe_simple_vocab_16e6.txt.gz.
    Records the path of every GET."""

    def __init__(self):
        self.files, self.requests = {}, []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                data = mirror.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def weights(openai_model):
    return openai_layout_weights(openai_model, seed=0)


@pytest.fixture(scope="module")
def mirror(weights):
    """Serves the stand-in as ViT-L/14 and as ViT-B/32 (same bytes), and the vocabulary."""
    mirror = Mirror()
    digest = hashlib.sha256(weights).hexdigest()
    mirror.files = {f"/{digest}/ViT-L-14.pt": weights, f"/{digest}/ViT-B-32.pt": weights,
                    f"/{safeclip.VOCAB_FILE}": VOCAB}
    mirror.table = {"ViT-L/14": digest, "ViT-B/32": digest}
    yield mirror
    mirror.close()


@pytest.fixture
def repo(tmp_path):
    """A working copy of the repository with the user's data in it."""
    root = tmp_path / "safeclip"
    root.mkdir()
    for name in ("safeclip.py", "evaluate.py"):
        shutil.copy(ROOT / name, root / name)
    (root / "weights").mkdir()
    make_pairs(root, n=32, splits=("train", "train", "val", "test"))  # 16 train rows: one batch of 16
    return root


def command(line, cwd, mirror_url, kill_after_step=None, **env):
    """Run `line` as typed (split on spaces; "python" is this interpreter) in `cwd`; with
    `kill_after_step`, kill it with SIGKILL on seeing that step in runs/safeclip/log.jsonl."""
    argv = [sys.executable if word == "python" else word for word in line.split()]
    environ = {**os.environ, "SAFECLIP_BASE_URL": mirror_url, "no_proxy": "127.0.0.1",
               "XDG_CACHE_HOME": str(Path(cwd).parent / "cache"), **env}
    environ.pop("SAFECLIP_WEIGHTS", None)
    if kill_after_step is not None:
        log = Path(cwd) / "runs" / "safeclip" / "log.jsonl"
        code = run_killed_after_step(argv, log, kill_after_step, cwd=cwd, env=environ)
        return subprocess.CompletedProcess(argv, code, "", "")
    return subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_train_alone_then_evaluate_alone_as_typed_from_the_root_and_from_another_folder(repo, mirror):
    """One user's session. Every command is a separate process, as typed."""
    models = repo.parent / "models.json"  # the stand-in's URL: OpenAI's, with the stand-in's hash
    models.write_text(json.dumps({name: safeclip.OPENAI_MODELS[name].rsplit("/", 2)[0] + f"/{digest}/" +
                                  safeclip.OPENAI_MODELS[name].rsplit("/", 1)[1] for name, digest in mirror.table.items()}))
    table = {"SAFECLIP_MODELS": str(models)}
    before = len(mirror.requests)
    # `train --data pairs.jsonl`, hard-killed (from outside, SIGKILL) after step 3 of the default run,
    # as after a crash: on seeing step 4's log record, before that step's validation and checkpoint.
    first = command("python safeclip.py train --data pairs.jsonl", repo, mirror.url, kill_after_step=4, **table)
    assert first.returncode == -9, first.stderr
    digest = mirror.table["ViT-L/14"]
    assert sorted(mirror.requests[before:]) == [f"/{digest}/ViT-L-14.pt", f"/{safeclip.VOCAB_FILE}"]
    # (and beside them only the hidden stamp that remembers ViT-L-14.pt's verified SHA-256)
    assert sorted(p.name for p in (repo / "weights").iterdir() if not p.name.startswith(".")) == ["ViT-L-14.pt", safeclip.VOCAB_FILE]
    run = repo / "runs" / "safeclip"
    config = json.loads((run / "train_config.json").read_text())
    assert config["model"] == "ViT-L/14" and config["data"] == str(repo / "pairs.jsonl")
    assert (config["lora_rank"], config["lora_alpha"], config["lr"], config["batch_size"]) == (16, 1.0, 1e-3, 16)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["step"] == 3

    # The same command again does not touch the run, and says how to go on.
    intact = snapshot(run)
    again = command("python safeclip.py train --data pairs.jsonl", repo, mirror.url, **table)
    assert again.returncode != 0
    message = again.stderr.strip().splitlines()[-1]
    assert "runs/safeclip already holds a run" in message and "--resume" in message and "another --out" in message
    assert snapshot(run) == intact

    resumed = command("python safeclip.py train --data pairs.jsonl --resume", repo, mirror.url, **table)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from runs/safeclip/checkpoint.pt at step 3" in resumed.stderr
    # step records only: not the active-terms line (step 0) nor the validation lines
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[:4] == [1, 2, 3, 4] and (run / "config.json").is_file()
    assert len(mirror.requests) == before + 2  # the verified weights were not fetched again

    # `evaluate.py --ckpt runs/safeclip` alone == the fully spelled-out command.
    alone = command("python evaluate.py --ckpt runs/safeclip --json alone.json", repo, mirror.url, **table)
    assert alone.returncode == 0, alone.stderr
    spelled = command(f"python evaluate.py --ckpt runs/safeclip --data {repo / 'pairs.jsonl'} --baseline ViT-L/14 "
                      "--split test --json spelled.json", repo, mirror.url, **table)
    assert spelled.returncode == 0, spelled.stderr
    report = json.loads((repo / "alone.json").read_text())
    assert report == json.loads((repo / "spelled.json").read_text())
    assert report["split"] == "test" and set(report["models"]) == {"model", "baseline"}
    assert alone.stdout.splitlines()[:3] == [f"{repo / 'pairs.jsonl'}, split test: 8 quadruplets",
                                             "model: runs/safeclip", f"baseline: {repo / 'weights' / 'ViT-L-14.pt'}"]

    # From another folder: the weights are found beside safeclip.py, the run goes where the user is,
    # and the run's own record finds the data.
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    trained = command("python ../safeclip/safeclip.py train --data ../safeclip/pairs.jsonl --epochs 1",
                      elsewhere, mirror.url, **table)
    assert trained.returncode == 0, trained.stderr
    assert (elsewhere / "runs" / "safeclip" / "config.json").is_file()
    assert len(mirror.requests) == before + 2
    evaluated = command("python ../safeclip/evaluate.py --ckpt runs/safeclip", elsewhere, mirror.url, **table)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith(f"{repo / 'pairs.jsonl'}, split test: 8 quadruplets\n")


def test_offline_the_error_says_what_failed_and_the_two_ways_out(repo):
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        done = command("python safeclip.py train --data pairs.jsonl", repo, url)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1
    message = lines[-1]
    assert message.startswith("error: ViT-L/14 is not in ") and "cannot reach" in message
    assert "`python safeclip.py download ViT-L/14` on a machine with network access" in message
    assert "copy its weights/ folder" in message and "--model PATH" in message
    assert not (repo / "runs").exists()
    assert list((repo / "weights").iterdir()) == []  # no partial file


def test_load_by_name_is_load_by_path_of_the_verified_file(mirror, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFECLIP_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("SAFECLIP_BASE_URL", mirror.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32", f"https://x.invalid/{mirror.table['ViT-B/32']}/ViT-B-32.pt")
    by_name, _ = safeclip.load("ViT-B/32")
    (tmp_path / "copy.pt").write_bytes(weights)
    by_path, _ = safeclip.load(tmp_path / "copy.pt", tokenizer=tmp_path / "w" / safeclip.VOCAB_FILE)
    assert (tmp_path / "w" / "ViT-B-32.pt").read_bytes() == weights
    assert by_name.config == by_path.config
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values()))
    assert torch.equal(by_name.tokenizer(["a cat"]), by_path.tokenizer(["a cat"]))


def test_unknown_names_and_wrong_files_are_refused(mirror, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFECLIP_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("SAFECLIP_BASE_URL", mirror.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(FileNotFoundError, match=r"ViT-L/16: no such file or folder, nor a model name "
                                                r"\(ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px\)"):
        safeclip.load("ViT-L/16")
    # The mirror's file does not have the hash the table promises: refused, nothing kept.
    wrong = hashlib.sha256(b"another file").hexdigest()
    monkeypatch.setitem(safeclip.OPENAI_MODELS, "ViT-B/32", f"https://x.invalid/{wrong}/ViT-B-32.pt")
    mirror.files[f"/{wrong}/ViT-B-32.pt"] = weights
    try:
        with pytest.raises(safeclip.DownloadError, match=rf"ViT-B/32 is not in .* SHA-256 .* expected {wrong}"):
            safeclip.load("ViT-B/32")
    finally:
        del mirror.files[f"/{wrong}/ViT-B-32.pt"]
    assert not (tmp_path / "w" / "ViT-B-32.pt").exists() and not (tmp_path / "w" / "ViT-B-32.pt.part").exists()
    # A wrong file already in the weights folder is never loaded under the name.
    (tmp_path / "w" / "ViT-B-32.pt").write_bytes(weights)
    monkeypatch.setenv("SAFECLIP_BASE_URL", mirror.url + "/nowhere")
    with pytest.raises(safeclip.DownloadError, match="HTTP 404"):
        safeclip.load("ViT-B/32")


def test_evaluate_needs_data_for_a_checkpoint_that_train_did_not_write(weights, tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(weights)
    with pytest.raises(SystemExit) as stop:
        ev.parse_args(["--ckpt", str(tmp_path / "w.pt")])
    assert stop.value.code == 2
    assert (f"--data is required: {tmp_path / 'w.pt'} is not a folder written by safeclip.py train (it has no "
            "train_config.json)") in capsys.readouterr().err


def test_evaluate_defaults_stop_on_an_empty_split_with_the_splits_that_exist(tmp_path, capsys):
    data = make_pairs(tmp_path / "data", n=4, splits=("train", "val"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"data": str(data), "model": None}))
    args = ev.parse_args(["--ckpt", str(run)])
    assert (args.data, args.baseline, args.split) == (str(data), None, "test")  # no base model: from scratch
    (run / "train_config.json").write_text(json.dumps({"data": str(data), "model": "ViT-L/14"}))
    assert ev.parse_args(["--ckpt", str(run)]).baseline == "ViT-L/14"
    assert ev.parse_args(["--ckpt", str(run), "--no-baseline"]).baseline is None
    with pytest.raises(ev.EvalError, match=r"no rows in split 'test' \(splits present: train, val\); choose one "
                                           "with --split"):
        ev.read_split(args.data, args.split)
    explicit = ev.parse_args(["--ckpt", str(run), "--data", "other.jsonl", "--split", "val", "--baseline", "b.pt"])
    assert (explicit.data, explicit.split, explicit.baseline) == ("other.jsonl", "val", "b.pt")  # flags win


def test_help_lists_the_commands_and_shows_each_default_once(capsys):
    done = subprocess.run([sys.executable, "safeclip.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0
    for name in ("train", "export", "download"):
        assert re.search(rf"^    {name} +\S.*$", done.stdout, re.M), name
    parser = safeclip.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    texts = [parser.format_help()] + [p.format_help() for p in commands.values()]
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    texts.append(capsys.readouterr().out)
    for text in texts:
        flat = " ".join(text.split())  # argparse wraps lines anywhere
        assert "(default: None)" not in flat and "(default: False)" not in flat
        for option in re.split(r"\s(?=--?[a-z])", flat):
            assert option.count("default") <= 1, option
