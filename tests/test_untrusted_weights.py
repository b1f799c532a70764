"""Weight and tokenizer files from the internet cost bounded memory and time: each small hostile
file below is refused with one error that names it, and the process that reads it stays far below
the memory the file claims (measured in a child process, as its peak resident set)."""

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

import safeclip

MB = 1 << 20


def peak_mib(code):
    """Run `code` in a fresh Python that has imported safeclip: its peak resident memory in MiB (the
    kernel's high-water mark, VmHWM, read by the child itself: a forked child's ru_maxrss would
    start from the parent's) and its stderr."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import safeclip, torch\n"
              f"try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
              "finally:\n    print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VmHWM")))
    return kib / 1024, proc.stderr


@pytest.fixture(scope="module")
def baseline():
    return peak_mib("pass")[0]


def expect_refusal(code, baseline, claimed_mib, match):
    """`code` must raise an error matching `match` while the child stays far below what is claimed."""
    peak, err = peak_mib(f"try:\n    {code}\nexcept Exception as e:\n    print(f'{{type(e).__name__}}: {{e}}', "
                         "file=sys.stderr)\nelse:\n    print('accepted', file=sys.stderr)")
    assert match in err and "Traceback" not in err, err[-2000:]
    assert peak - baseline < claimed_mib / 4, (peak, baseline, claimed_mib)
    return err


def zip_copy(src_bytes, dst, compress=lambda name: False, extra=()):
    """A copy of the zip archive `src_bytes` at `dst`, compressing the entries `compress` picks."""
    src = zipfile.ZipFile(io.BytesIO(src_bytes))
    with zipfile.ZipFile(dst, "w") as z:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if compress(info.filename) else zipfile.ZIP_STORED
            z.writestr(info.filename, src.read(info.filename), compress_type=kind)
        for name, data in extra:
            z.writestr(name, data)
    return dst


def test_a_stride_0_tensor_claiming_36m_values_is_refused_before_it_is_materialised(tmp_path, baseline):
    buffer = io.BytesIO()
    torch.save({"visual.conv1.weight": torch.zeros(1).expand(6000, 6000)}, buffer)  # 1 value, a 6000 x 6000 view
    prefix = zipfile.ZipFile(io.BytesIO(buffer.getvalue())).namelist()[0].split("/")[0]
    # As a TorchScript archive (OpenAI's kind: read by our own unpickler) and as a plain torch.save file.
    script = zip_copy(buffer.getvalue(), tmp_path / "script.pt", extra=[(f"{prefix}/constants.pkl", b"")])
    plain = tmp_path / "plain.pt"
    plain.write_bytes(buffer.getvalue())
    assert script.stat().st_size < 4096
    for path in (script, plain):
        err = expect_refusal(f"safeclip.load({str(path)!r})", baseline, 6000 * 6000 * 4 / MB,
                             "needs 36000000 values, but its storage holds 1")
        assert str(path) in err


def test_a_compressed_tensor_entry_is_refused_before_it_is_inflated(tmp_path, baseline):
    buffer = io.BytesIO()
    torch.save({"visual.conv1.weight": torch.zeros(150_000_000)}, buffer)  # 600 MB of zeros
    bomb = zip_copy(buffer.getvalue(), tmp_path / "bomb.pt", compress=lambda name: "/data/" in name)
    del buffer
    assert bomb.stat().st_size < 2 * MB
    err = expect_refusal(f"safeclip.load({str(bomb)!r})", baseline, 600, "is compressed, which PyTorch never writes")
    assert str(bomb) in err


def test_shapes_that_imply_a_50_gb_model_are_refused_before_it_is_allocated(tmp_path, baseline):
    """Empty tensors whose shapes imply a 65536-wide, 40-layer vision tower (4 KB on disk)."""
    width, sd = 65536, {}
    sd["visual.conv1.weight"] = torch.empty(width, 3, 14, 0)
    sd["visual.positional_embedding"], sd["positional_embedding"] = torch.empty(257, 0), torch.empty(77, 0)
    sd["visual.proj"], sd["text_projection"] = torch.empty(0, 768), torch.empty(0, 768)
    sd["token_embedding.weight"], sd["ln_final.weight"] = torch.empty(49408, 0), torch.empty(0)
    for i in range(40):
        sd[f"visual.transformer.resblocks.{i}.ln_1.weight"] = torch.empty(0)
    save_file(sd, tmp_path / "huge.safetensors")
    assert (tmp_path / "huge.safetensors").stat().st_size < 8192
    expect_refusal(f"safeclip.load({str(tmp_path / 'huge.safetensors')!r})", baseline, 50_000,
                   f"the tensors' shapes imply vision_width = {width}, outside 1..16384")
    # Within the bounds, a shape that does not fit is refused by name before the model exists.
    config = safeclip.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_heads=1,
                                 vision_patch_size=8, context_length=16, vocab_size=100, text_width=64, text_heads=1,
                                 text_layers=1)
    small = {**safeclip.CLIP(config).state_dict(), "visual.ln_pre.weight": torch.zeros(65)}
    with pytest.raises(safeclip.CheckpointError, match=r"small: 'visual.ln_pre.weight' has shape \(65,\), expected"):
        safeclip.build_model(small, config, "small")


def test_a_tokenizer_id_of_50_million_is_refused(tmp_path, baseline):
    vocab = {c: i for i, c in enumerate(safeclip.BYTE_TO_CHAR.values())}
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": [], "end_of_word_suffix": "</w>"},
            "added_tokens": [{"content": "<|startoftext|>", "id": 256}, {"content": "<|endoftext|>", "id": 50_000_000}]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    expect_refusal(f"safeclip.Tokenizer.from_file({str(path)!r})", baseline, 400,
                   "has id 50000000, outside the vocabulary's 0..257")


def test_a_vocabulary_that_inflates_to_600_mb_is_refused_after_64(tmp_path, baseline):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"#version: 0.2\n")
        for _ in range(150):
            f.write(b"a b\n" * MB)  # 4 MB at a time
    assert path.stat().st_size < 2 * MB
    err = expect_refusal(f"safeclip.Tokenizer.from_file({str(path)!r})", baseline, 600,
                         "inflates to more than 64 MiB")
    assert str(path) in err


@pytest.mark.parametrize("spec,problem", [
    ({"model": {"type": "BPE", "vocab": {}, "merges": [], "end_of_word_suffix": "</w>"}, "added_tokens": [{}]},
     "added_tokens[0] needs a string 'content' and an integer 'id'"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "JSON nested too deeply"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7], "end_of_word_suffix": "</w>"}}, "malformed"),
])
def test_malformed_tokenizer_files_are_one_error_naming_the_file(tmp_path, spec, problem):
    path = tmp_path / "tokenizer.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(ValueError) as raised:
        safeclip.Tokenizer.from_file(path)
    assert str(raised.value).startswith(f"{path}: ") and problem in str(raised.value)
