"""evaluate.py on inputs it cannot trust (issue 27): the figure cuts a caption of any length to a
few lines, and the embedding cache writes through temporary files no one can predict, trusts a
file only for the hash recorded with it, and is keyed by the tokenizer actually used."""

import gzip
import os
import shutil
import time

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate as ev
import safeclip
from test_evaluate import args_for, counting_load, tiny_clip, world

__all__ = ["world"]  # the fixture, imported for the tests below


def test_a_huge_caption_is_cut_to_a_few_lines_in_the_figure(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "gray").save(image)

    def figure(caption):  # the caption as a query, and as each of the captions an image retrieves
        row = {"unsafe": caption, "unsafe_image": str(image)}
        found = {"T*->V+V*": [[(str(image), True)] * ev.FIGURE_TOP],
                 "V*->T+T*": [[(caption, True)] * ev.FIGURE_TOP]}
        return ev.draw_figure([row], [row], {"model": found}, {"model": "model"})

    usual = figure("a man riding a horse on a beach, covered in blood")
    most = figure(" ".join(["bloody"] * 200))  # the most lines a caption gets
    assert most.size[1] > usual.size[1]
    for huge in ("blood " * 25_000, "." * 150_000):  # 146 KB of words, and one word as long
        start = time.monotonic()
        drawn = figure(huge)
        assert time.monotonic() - start < 5
        assert drawn.size == most.size  # a 146 KB caption drew a canvas of 101 MB
    draw, font = ImageDraw.Draw(usual), ev._font(13)
    assert ev._wrap(draw, "blood " * 25_000, font, 100)[-1].endswith("...")
    assert ev._wrap(draw, " " * 5_000 + "blood", font, 100) == ["..."]


def test_a_deeply_nested_train_config_stops_with_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit) as exit_:
        ev.parse_args(["--ckpt", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "train_config.json: unreadable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The embedding cache


def test_cache_and_reports_are_never_written_through_a_predictable_name(world, tmp_path):
    argv = args_for(world, tmp_path, "--json", str(tmp_path / "e.json"))
    ev.main(argv)
    report = (tmp_path / "e.json").read_text()
    cache = tmp_path / "cache"
    names = sorted(p.name for p in cache.iterdir())
    # Someone else who can write to a shared --cache-dir plants links where the temporary files
    # used to go (.NAME.PID.tmp), to a file of the user's.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    for name in names:
        (cache / name).unlink()
        (cache / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    (tmp_path / f".e.json.{os.getpid()}.tmp").symlink_to(victim)
    ev.main(argv)
    assert victim.read_text() == "keep me\n"
    assert sorted(p.name for p in cache.iterdir() if not p.is_symlink()) == names
    assert (tmp_path / "e.json").read_text() == report and not (tmp_path / "e.json").is_symlink()


def test_a_cache_file_is_trusted_for_its_recorded_hash_not_its_length(world, tmp_path, monkeypatch, capsys):
    argv = args_for(world, tmp_path, "--json", str(tmp_path / "e.json"))
    ev.main(argv)
    report = (tmp_path / "e.json").read_text()
    g = torch.Generator().manual_seed(0)
    for path in (tmp_path / "cache").iterdir():  # the same length and metadata, other numbers
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        emb = load_file(path)["embeddings"]
        save_file({"embeddings": torch.randn(emb.shape, generator=g)}, path, metadata=metadata)
    loads = counting_load(monkeypatch)
    ev.main(argv)
    assert loads == [str(world / "model")]  # computed again
    assert (tmp_path / "e.json").read_text() == report
    assert "ignoring cache file" in capsys.readouterr().err


def test_the_tokenizer_found_for_a_single_weights_file_is_in_the_cache_key(world, tmp_path, monkeypatch,
                                                                           openai_vocab):
    """safeclip.load looks for OpenAI's vocabulary beside a single weights file, then in ./weights
    and the weights folder: whichever it finds makes the embeddings, so it keys the cache."""
    weights = tmp_path / "ckpt" / "model.pt"
    safeclip.export_openai(tiny_clip(1, safeclip.Tokenizer.from_file(openai_vocab)), weights)
    header, *merges = gzip.decompress(openai_vocab.read_bytes()).decode().split("\n")

    def vocabulary(folder, k):  # OpenAI's, with merges k and k + 1 swapped: the same size, another BPE
        changed = list(merges)
        changed[k], changed[k + 1] = changed[k + 1], changed[k]
        folder.mkdir(exist_ok=True)
        (folder / safeclip.VOCAB_FILE).write_bytes(gzip.compress("\n".join([header, *changed]).encode()))

    monkeypatch.chdir(tmp_path)  # no ./weights here
    monkeypatch.setenv("SAFECLIP_WEIGHTS", str(tmp_path / "weights-folder"))
    argv = args_for(world, tmp_path)
    argv[argv.index("--ckpt") + 1] = str(weights)
    loads = counting_load(monkeypatch)
    shutil.copy(openai_vocab, weights.parent / safeclip.VOCAB_FILE)
    ev.main(argv)
    ev.main(argv)
    assert len(loads) == 1
    vocabulary(weights.parent, 100)
    ev.main(argv)
    assert len(loads) == 2  # another vocabulary beside the weights
    (weights.parent / safeclip.VOCAB_FILE).unlink()
    vocabulary(tmp_path / "weights-folder", 200)
    ev.main(argv)
    assert len(loads) == 3  # none beside them: the weights folder's
    shutil.copy(openai_vocab, tmp_path / "weights-folder" / safeclip.VOCAB_FILE)
    ev.main(argv)
    assert len(loads) == 3  # the first run's vocabulary again, wherever it lies: from the cache
