"""benchmarks/bench.py: in its smallest mode it runs end to end and writes its table, and the two
sides of every comparison do the same work (embeddings agree, token ids are identical, the same
LoRA weights train). Speeds are not checked: they belong to the machine. The FLOP counts the table
prints are checked against torch's own FLOP counter."""

import importlib.util
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import safeclip


BENCH = ROOT / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args):
    # A generous timeout: a shared CI machine can be several times slower than a quiet one.
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900)


def test_tiny_run_writes_the_table_between_markers_and_both_sides_agree(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\nprose\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nmore prose\n")
    results = tmp_path / "results.json"
    proc = run_bench("--tiny", "--threads", "1", "--out", str(readme), "--json", str(results))
    assert proc.returncode == 0, proc.stderr[-4000:]

    text = readme.read_text()
    assert text.startswith("# Benchmarks\nprose\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\nmore prose\n")
    assert "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for label in ("encode_text", "encode_image", "Safe-CLIP training", "peak memory", "activations autograd keeps",
                  "--grad-checkpointing", "bf16 autocast (ours)", "tokenization"):
        assert any(label in row.split("|")[1] for row in rows), label
    assert proc.stdout.count("| measure |") == 1  # the same table goes to stdout

    r = json.loads(results.read_text())["results"]
    for key in ("encode_text", "encode_image"):
        assert r[key]["max_rel_diff"] < 1e-4 and r[key]["min_cosine"] > 0.9999, key
    assert r["tokenize"]["identical_ids"]
    train = r["train"]
    ours, recipe = train["runs"]["ours"][0], train["runs"]["recipe"][0]
    steps = 2 * (16 // 8)  # --tiny: 2 epochs of 16 quadruplets in batches of 8
    assert ours["steps"] == recipe["steps"] == steps
    assert ours["trainable"] == recipe["trainable"] == train["trainable"] > 0
    assert all(math.isfinite(x) for x in (ours["first_loss"], ours["last_loss"], recipe["first_loss"], recipe["last_loss"]))
    # Trimmed text and two passes instead of four trained ones keep fewer activations: a count of
    # bytes, not a timing, so it holds on any machine.
    assert ours["activation_bytes"] < recipe["activation_bytes"]
    assert train["grad_checkpointing"]["steps"] == 1
    assert train["bf16"]["steps"] == 1 and math.isfinite(train["bf16"]["first_loss"])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_flop_formulas_match_torch_flop_counter_on_both_sides(tmp_path):
    """Every matmul FLOP of a forward and a LoRA training pass, ours and transformers + peft's,
    counted by torch (attention through the math kernel, which the counter sees)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    bench = load_bench()
    s = bench.MODELS["tiny"]
    rank = bench.RECIPE["rank"]

    def count(fn):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    ids = torch.zeros(3, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1:12], ids[:, 12] = 49406, 320, 49407  # 13 positions used, SOT to EOT
    pixels = torch.randn(3, 3, 32, 32)

    torch.manual_seed(0)
    ours = safeclip.CLIP(safeclip.CLIPConfig(**s, vision_heads=1, text_heads=1))
    assert count(lambda: ours.encode_text(ids)) == 3 * bench.text_flops(s, 13, pooled=True)
    assert count(lambda: ours.encode_image(pixels)) == 3 * bench.image_flops(s, pooled=True)
    safeclip.add_lora(ours, rank, 1.0, 0.1)
    ours.train()
    assert count(lambda: ours.encode_text(ids).sum().backward()) == 3 * bench.text_flops(s, 13, rank, train=True, pooled=True)
    assert count(lambda: ours.encode_image(pixels).sum().backward()) == 3 * bench.image_flops(s, rank, train=True, pooled=True)

    bench.write_weights(tmp_path, s, seed=0)
    config = LoraConfig(r=rank, lora_alpha=1, target_modules=bench.RECIPE["targets"], lora_dropout=0.1, bias="none")
    text = get_peft_model(CLIPTextModelWithProjection.from_pretrained(tmp_path), config).train()
    vision = get_peft_model(CLIPVisionModelWithProjection.from_pretrained(tmp_path), config).train()
    for name, p in itertools.chain(text.named_parameters(), vision.named_parameters()):
        p.requires_grad_("lora" in name)
    inputs = dict(input_ids=ids, attention_mask=bench.attention_mask(ids))
    with torch.no_grad():  # the recipe's "frozen" passes: the LoRA model under no_grad, all 77 positions
        assert count(lambda: text(**inputs)) == 3 * bench.text_flops(s, 77, rank)
        assert count(lambda: vision(pixel_values=pixels)) == 3 * bench.image_flops(s, rank)
    assert count(lambda: text(**inputs).text_embeds.sum().backward()) == 3 * bench.text_flops(s, 77, rank, train=True)
    assert count(lambda: vision(pixel_values=pixels).image_embeds.sum().backward()) == \
        3 * bench.image_flops(s, rank, train=True)


def test_attention_mask_covers_sot_to_eot_even_when_a_caption_holds_token_zero():
    bench = load_bench()
    ids = torch.tensor([[49406, 0, 5, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0]])  # id 0 is "!", also padding
    assert bench.attention_mask(ids).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_a_training_set_smaller_than_one_batch_is_refused_before_any_work():
    proc = run_bench("--tiny", "--pairs", "4", "--batch-size", "8")
    assert proc.returncode == 2
    assert "--pairs 4 is less than one batch (--batch-size 8)" in proc.stderr
