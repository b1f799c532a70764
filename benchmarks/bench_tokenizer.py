"""Batch tokenization speed: safeclip.Tokenizer against OpenAI's SimpleTokenizer + clip.tokenize.

Both run in this process on the same captions: N captions of 6-24 words drawn from a vocabulary
of thousands of words (common words, rarer ones, numbers, punctuation, contractions), as real
captions are. "cold" is a fresh tokenizer's first pass (both cache the BPE of words they have
seen), "warm" a second pass over the same captions. Needs clip-anytorch and ftfy for OpenAI's side.

    python benchmarks/bench_tokenizer.py [--captions 10000] [--rounds 5]
"""

import argparse
import gzip
import importlib.util
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402


def load_openai_tokenizer_module():
    # clip/__init__.py imports torchvision; load only simple_tokenizer.py, by its path.
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", os.path.join(folder, "simple_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")


def openai_tokenize(tokenizer, texts, context_length=77):
    # clip.tokenize(texts, context_length, truncate=True), line for line (clip/clip.py).
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    all_tokens = [[sot] + tokenizer.encode(text) + [eot] for text in texts]
    result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


def make_captions(bpe_path, n, seed=0):
    """n captions from ~6,000 English words taken from the BPE vocabulary itself."""
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:safeclip.OPENAI_MERGES + 1]
    words = [a + b[:-4] for a, b in (m.split() for m in merges)
             if b.endswith("</w>") and (a + b[:-4]).isascii() and (a + b[:-4]).isalpha() and len(a + b) > 6]
    common, rare = words[:5000], words[-1500:]  # merges are in frequency order
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words_ = [rng.choice(rare) if rng.random() < 0.15 else rng.choice(common) for _ in range(rng.randint(6, 24))]
        if rng.random() < 0.3:
            words_.insert(rng.randrange(len(words_)), str(rng.randint(2, 1999)))
        if rng.random() < 0.3:
            i = rng.randrange(len(words_))
            words_[i] += rng.choice(["'s", "'re", ",", ";", " -", "'ll"])
        caption = " ".join(words_)
        captions.append(caption[0].upper() + caption[1:] + rng.choice([".", ".", "!", "?", "", "..."]))
    return captions


def measure(fn):
    """(wall seconds, CPU seconds of all this process's threads) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=10_000, help="number of captions (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of fresh tokenizers, OpenAI's then ours, "
                        "so that both see the same load on a shared machine (default 5)")
    args = parser.parse_args()

    simple_tokenizer, bpe_path = load_openai_tokenizer_module()
    captions = make_captions(bpe_path, args.captions)
    runs = {key: [] for key in ("openai cold", "safeclip cold", "openai warm", "safeclip warm")}
    for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
        openai = simple_tokenizer.SimpleTokenizer(bpe_path)
        runs["openai cold"].append(measure(lambda: openai_tokenize(openai, captions)))
        runs["openai warm"].append(measure(lambda: openai_tokenize(openai, captions)))
        ours = safeclip.Tokenizer.from_file(bpe_path)
        runs["safeclip cold"].append(measure(lambda: ours(captions)))
        runs["safeclip warm"].append(measure(lambda: ours(captions)))
    if not torch.equal(openai_tokenize(openai, captions), ours(captions)):
        sys.exit("ids differ from OpenAI's on these captions")

    print(f"{args.captions} captions, {os.cpu_count()} CPUs, medians of {args.rounds} rounds; "
          f"speedup = median over rounds of OpenAI's wall time / ours in the same round")
    print(f"{'tokenizer':<15}{'wall s':>8}{'  (min-max)':<16}{'captions/s':>11}{'speedup':>9}{'CPU s':>8}")
    for key, measured in runs.items():
        wall = [w for w, _ in measured]
        baseline = [w for w, _ in runs["openai " + key.split()[1]]]
        speedup = statistics.median(b / w for b, w in zip(baseline, wall))
        print(f"{key:<15}{statistics.median(wall):>8.3f}  ({min(wall):.3f}-{max(wall):.3f})"
              f"{args.captions / statistics.median(wall):>11,.0f}{speedup:>8.2f}x"
              f"{statistics.median(c for _, c in measured):>8.3f}")


if __name__ == "__main__":
    main()
