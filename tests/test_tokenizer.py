"""safeclip.Tokenizer against OpenAI's own tokenizer (clip-anytorch's simple_tokenizer.py)."""

import gzip
import os
import json
import random
import re
import subprocess
import sys

import pytest
import regex
import tokenizers
import torch

from conftest import ROOT, clip_package_dir, load_reference

import safeclip

# ---------------------------------------------------------------------------------------------
# The oracle: OpenAI's SimpleTokenizer and clip.tokenize(..., truncate=True)
# ---------------------------------------------------------------------------------------------


SIMPLE_TOKENIZER = load_reference("simple_tokenizer")
OPENAI_BPE = str(clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz")


def openai_tokenize(openai, texts, context_length=77):
    """clip.tokenize(texts, context_length, truncate=True) from clip/clip.py (which imports torchvision)."""
    sot, eot = openai.encoder["<|startoftext|>"], openai.encoder["<|endoftext|>"]
    all_tokens = [[sot] + openai.encode(text) + [eot] for text in texts]
    result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


@pytest.fixture(scope="module")
def openai():
    return SIMPLE_TOKENIZER.SimpleTokenizer(OPENAI_BPE)


@pytest.fixture(scope="module")
def tok():
    return safeclip.Tokenizer.from_file(OPENAI_BPE)


# ---------------------------------------------------------------------------------------------
# Inputs where equal ids are impossible without ftfy (or differ for another, stated reason)
# ---------------------------------------------------------------------------------------------

KNOWN_DIFFERENCES = {
    # ftfy repairs mojibake (UTF-8 text decoded as Latin-1 / Windows-1252): a heuristic, not a table.
    "cafÃ©": "ftfy repairs mojibake: 'cafÃ©' -> 'café'",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.": "ftfy repairs double mojibake of ’",
    "â€œquotedâ€\x9d": "ftfy repairs mojibake of “ ” (also C1 controls inside mojibake)",
    "voilÃ le travail": "ftfy repairs mojibake whose 0xA0 byte became a space",
    # HTML: ftfy also decodes all-caps entities, and unescapes until nothing changes; OpenAI's own
    # code (and ours) unescapes twice.
    "&EACUTE;cole": "ftfy decodes all-caps HTML entities",
    "A&NBSP;B": "ftfy decodes all-caps HTML entities",
    "&amp;amp;amp;lt;": "ftfy unescapes HTML more than twice",
    # ftfy decodes only references that end in ";", so the curly quote that html.unescape later makes
    # of "&#8217" stays curly in OpenAI's text; we unescape first, then straighten it.
    "it&#8217s": "HTML reference without ';' that makes a character ftfy would fix",
    # ftfy removes whole ANSI terminal escapes; we drop only the escape character.
    "\x1b[31mred\x1b[0m alert": "ftfy removes terminal escape sequences",
    # Not ftfy: OpenAI's regex is case-insensitive, and U+0345 case-folds to the letter ι without
    # being one, so no branch matches it and OpenAI silently drops it.
    "a\u0345b": "OpenAI's case-insensitive split drops U+0345",
    "<|ſtartoftext|>": "OpenAI's case-insensitive split reads ſ as s in the SOT marker",
    # Not ftfy: tokenizers finds special-token markers before splitting, OpenAI's regex lets a
    # punctuation run swallow the "<|".
    "wait!<|endoftext|>": "special-token marker right after punctuation",
    "'<|startoftext|>": "special-token marker right after punctuation",
}
# Not ftfy, and depends on the installed `regex`: letters added in Unicode 17.0 (CJK Extension J
# and others) are letters to regex >= 2025.9 but not yet to tokenizers' Oniguruma.
UNICODE_17_LETTER = "\U000323b0"
if regex.fullmatch(r"\p{L}", UNICODE_17_LETTER):
    KNOWN_DIFFERENCES[f"a{UNICODE_17_LETTER}b"] = "a Unicode 17 letter inside a word"


WORDS = """a an the photo picture image of on in at with and or but cat dog man woman child people street
car bus train bicycle table chair pizza sandwich sitting standing walking running holding looking red
blue green yellow black white large small old young two three several many next to near under above
beach mountain river city kitchen bedroom field grass snow water sky tree house building window door
plate bowl cup knife fork phone laptop computer television book bag umbrella kite surfboard skateboard
giraffe elephant zebra horse sheep cow bird bear teddy clock vase scissors toothbrush hair drier sign
stop fire hydrant parking meter bench frisbee skis baseball bat glove tennis racket bottle wine glass
banana apple orange broccoli carrot hot donut cake couch potted plant bed toilet remote keyboard oven
weapon blood knife gun fight violence drugs naked angry crying screaming broken burning abandoned""".split()

PIECES = [
    # punctuation, digits, contractions
    "!", "?", "...", ",", ";", ":", "-", "--", "—", "(", ")", "[", "]", "{", "}", "/", "\\", "@", "#", "$", "%",
    "^", "*", "_", "+", "=", "~", "`", "|", "<", ">", "'", '"', "3.14", "1,000,000", "2nd", "COVID-19",
    "+1 (555) 010-9999", "50%", "$19.99", "1080p", "x264", "4x4", "it's", "IT'S", "we're", "they've", "I'm",
    "you'll", "he'd", "don't", "rock'n'roll", "'tis", "''s", "o'clock", "it'ſ",
    # accents, decomposed accents, other scripts
    "café", "naïve", "Ångström", "São Paulo", "Zürich", "e\u0301te\u0301", "Ꮳherokee", "ΟΔΟΣ", "Straße", "İstanbul",
    "北京的一家咖啡馆", "東京タワーの写真", "한국어 문장", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย",
    "Привет, мир", "ქართული", "Հայերեն", "தமிழ்", "ǅemal", "ｶﾞｷﾞ", "ＣＬＩＰ　ｍｏｄｅｌ", "ﬁsh ﬂag ﬃ",
    # emoji
    "🎉", "🐈‍⬛", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "1️⃣", "❤️", "☕", "😂😂😂",
    # HTML entities
    "&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&#x27;", "&nbsp;", "&eacute;", "&amp;amp;", "&copy;",
    "AT&T", "&notanentity;", "&rsquo;", "it&#8217;s", "&#150;", "&#x85;", "&#0;", "&AMP;", "a&#8203;b",
    "<b>it&rsquo;s</b>", "x < y &amp;&amp; it&#8217;s", "&lt;b&gt; it&rsquo;s", "it&rsquo;s\nx < y", "a<b\nc&rsquo;",
    # whitespace runs and invisible characters
    "   ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u2028", "\x0b", "\x0c", "\x85", "\u200b", "\ufeff",
    "\x00", "\x1c", "\x7f", "\u00ad", "\u2060", "\U000e0041",
    # ftfy's character fixes
    "it’s", "‘single’", "“double”", "„low”", "\x93quoted\x94", "\x80uro", "\x81", "ŉ",
    # special-token markers, surrogates
    " <|endoftext|> ", " <|startoftext|> ", "a<|endoftext|>b", "a\ud800b", "\ud83d\ude00",
]


def varied_texts(n=1100, seed=0):
    """Captions, captions salted with the pieces above, character soup, and texts far over 77 tokens."""
    rng = random.Random(seed)
    texts = list(PIECES) + list(KNOWN_DIFFERENCES)
    soup = "".join(PIECES) + "abcxyzABCXYZ0123456789      "
    while len(texts) < n:
        kind = rng.random()
        if kind < 0.45:
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 25))]
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(PIECES))
            sep = rng.choice([" ", " ", " ", "  ", "\t", " \n "])
            text = sep.join(words)
            if rng.random() < 0.1 and "&" not in text:  # ftfy would decode an all-caps entity
                text = text.upper()
            texts.append(text.capitalize() if rng.random() < 0.5 else text)
        elif kind < 0.8:
            text = "".join(rng.choice(soup) for _ in range(rng.randint(1, 40)))
            if not re.search("&[A-Z0-9]+;", text):  # an all-caps entity is a listed difference
                texts.append(text)
        elif kind < 0.95:
            texts.append(" ".join(rng.choice(WORDS + PIECES) for _ in range(rng.randint(60, 200))))
        else:
            texts.append(rng.choice(["x" * rng.randint(100, 900), "1" * rng.randint(70, 300),
                                     "ha" * rng.randint(40, 400), "!?" * rng.randint(40, 200)]))
    return texts


# ---------------------------------------------------------------------------------------------
# Same ids as OpenAI
# ---------------------------------------------------------------------------------------------


def test_ids_equal_openai_on_1000_varied_texts_except_the_listed_ones(tok, openai):
    texts = varied_texts()
    assert len(texts) >= 1000
    expected, actual = openai_tokenize(openai, texts), tok(texts)
    differs = {text for text, same in zip(texts, (expected == actual).all(dim=1).tolist()) if not same}
    unexpected = sorted(differs - set(KNOWN_DIFFERENCES))
    assert not unexpected, f"{len(unexpected)} texts differ from OpenAI, e.g. {unexpected[:5]}"
    assert differs == set(KNOWN_DIFFERENCES), f"listed but equal: {set(KNOWN_DIFFERENCES) - differs}"


def test_vocabulary_is_openais(tok, openai):
    assert tok._vocab == openai.encoder
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (49406, 49407, 49408)


def test_truncation_keeps_eot_last_like_clip_tokenize(tok, openai):
    texts = ["a photo of a cat " * 40, "one two three four five six seven eight nine ten", "short"]
    for length in (2, 5, 10, 77):
        assert torch.equal(tok(texts, context_length=length), openai_tokenize(openai, texts, length))
    row = tok(texts[0])[0]
    assert row[0] == tok.sot_id and row[-1] == tok.eot_id and (row != 0).all()


def test_layout_is_sot_tokens_eot_then_zeros(tok):
    ids = tok(["a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and not ids[0, 4:].any()
    assert ids[1, :2].tolist() == [49406, 49407] and not ids[1, 2:].any()


def test_single_string_gives_one_row(tok):
    assert torch.equal(tok("A cat."), tok(["A cat."]))
    assert tok("A cat.").shape == (1, 77)


def test_empty_batch_gives_empty_tensor(tok):
    assert tok([]).shape == (0, 77)


def test_non_string_text_is_rejected_with_its_index(tok):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok(["a cat", 3])


def test_context_length_below_two_is_rejected(tok):
    with pytest.raises(ValueError, match="at least 2"):
        tok("a cat", context_length=1)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, openai):
    """A CLIP tokenizer.json written by transformers from OpenAI's vocabulary and merges."""
    from transformers import CLIPTokenizer

    merges = sorted(openai.bpe_ranks, key=openai.bpe_ranks.get)
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    CLIPTokenizer(vocab=openai.encoder, merges=merges).save_pretrained(folder)
    return folder


def test_hugging_face_tokenizer_json_gives_the_same_ids(tok, hf_folder):
    texts = varied_texts(300, seed=1)
    from_json = safeclip.Tokenizer.from_file(hf_folder / "tokenizer.json")
    assert torch.equal(from_json(texts), tok(texts))
    assert torch.equal(safeclip.Tokenizer.from_file(hf_folder)(texts), tok(texts))  # the folder


def test_folder_prefers_tokenizer_json(tmp_path):
    safeclip.Tokenizer.train(["a toy caption", "another toy caption"], vocab_size=520).save(tmp_path)
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(open(OPENAI_BPE, "rb").read())
    assert safeclip.Tokenizer.from_file(tmp_path).vocab_size == 520


def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(tok, tmp_path):
    from transformers import CLIPTokenizer

    path = tok.save(tmp_path)
    hf = CLIPTokenizer.from_pretrained(tmp_path)
    plain = tokenizers.Tokenizer.from_file(str(path))  # the file's own normalizer, decoder and template
    captions = ["A photo of a cat, sitting on the mat!", "it's 3 o'clock in São Paulo", "Two dogs   play; one barks."]
    for caption, row in zip(captions, tok(captions)):
        ids = row[row != 0].tolist()
        assert hf(caption)["input_ids"] == ids and plain.encode(caption).ids == ids
        assert plain.decode(ids) == tok.decode(row) == hf.decode(ids, skip_special_tokens=True)


def test_uncompressed_merges_file_is_read_too(tok, tmp_path):
    path = tmp_path / "merges.txt"
    path.write_bytes(gzip.decompress(open(OPENAI_BPE, "rb").read()))
    texts = ["a photo of a cat", "Zürich 🎉"]
    assert torch.equal(safeclip.Tokenizer.from_file(path)(texts), tok(texts))


# ---------------------------------------------------------------------------------------------
# decode, train, save
# ---------------------------------------------------------------------------------------------


def test_decode_inverts_tokenization(tok, openai):
    # Not for texts with "<": special-token markers decode to nothing, and a curly quote that OpenAI
    # keeps in markup is straightened when the decoded text is tokenized again.
    texts = [t for t in varied_texts(400, seed=2) if t not in KNOWN_DIFFERENCES and "<" not in t]
    rows = tok(texts)
    fits = rows[:, -1] == 0  # not truncated
    decoded = tok.decode(rows[fits])
    assert torch.equal(tok(decoded), rows[fits])
    for row, text in zip(rows[fits][:50], decoded):
        assert text == openai.decode([i for i in row.tolist()[1:] if i not in (0, tok.eot_id)]).rstrip(" ")


def test_decode_drops_sot_and_stops_at_eot(tok):
    assert tok.decode(tok("A photo of a cat.")[0]) == "a photo of a cat ."
    assert tok.decode([320, 2368]) == "a cat"
    assert tok.decode(torch.tensor([49406, 320, 49407, 320, 320])) == "a"  # after EOT is padding
    assert tok.decode(tok(["a", "b"])) == ["a", "b"]


def test_decode_rejects_unknown_ids(tok):
    for bad in (49408, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is not in this vocabulary"):
            tok.decode([320, bad])


TOY_CAPTIONS = [f"a {c} {a} {n} {p} the {w}" for c in ("red", "blue", "green", "small", "old")
                for a in ("cat", "dog", "horse", "bird") for n in ("sits", "runs", "sleeps")
                for p in ("near", "under") for w in ("table", "tree", "house")]


def test_trained_tokenizer_follows_clip_conventions(openai):
    trained = safeclip.Tokenizer.train(TOY_CAPTIONS, vocab_size=540)
    assert trained.vocab_size == 540 and (trained.sot_id, trained.eot_id) == (538, 539)
    first_512 = {t: i for t, i in trained._vocab.items() if i < 512}
    assert first_512 == {t: i for t, i in openai.encoder.items() if i < 512}  # bytes, then bytes + "</w>"
    ids = trained(TOY_CAPTIONS)
    assert (ids[:, 0] == 538).all() and ids.max() == 539
    assert trained.decode(ids) == TOY_CAPTIONS


def test_trained_tokenizer_is_a_bpe_openais_code_agrees_with(tmp_path):
    # Write the learned merges in OpenAI's file format and tokenize with OpenAI's own code.
    trained = safeclip.Tokenizer.train(TOY_CAPTIONS, vocab_size=540)
    merges = json.loads(trained.save(tmp_path).read_text())["model"]["merges"]
    bpe_file = tmp_path / "toy_bpe.txt.gz"
    bpe_file.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)).encode()))
    reference = SIMPLE_TOKENIZER.SimpleTokenizer(str(bpe_file))
    texts = TOY_CAPTIONS[::7] + ["an unseen caption: 42 zebras!"]
    assert torch.equal(trained(texts), openai_tokenize(reference, texts))


def test_training_is_deterministic():
    a = safeclip.Tokenizer.train(TOY_CAPTIONS, vocab_size=600)
    b = safeclip.Tokenizer.train(list(TOY_CAPTIONS), vocab_size=600)
    assert a._merges == b._merges and a._vocab == b._vocab


def test_training_is_deterministic_across_processes(tmp_path):
    # The demo's toy captions tie often: the `tokenizers` trainer broke ties by a hash order drawn
    # afresh in each process, so two runs of the same small demo learned different ids (3 different
    # vocabularies in 6 runs on these captions). Each process here also has its own PYTHONHASHSEED.
    subprocess.run([sys.executable, str(ROOT / "generate_data.py"), "--toy", "600", "--image-size", "16",
                    "--out", str(tmp_path / "toy")], capture_output=True, check=True)
    code = ("import json, sys, safeclip; rows = [json.loads(l) for l in open(sys.argv[1])]; "
            "caps = [r[k] for r in rows if r['split'] == 'train' for k in ('safe', 'unsafe')]; "
            "print(safeclip.Tokenizer.train(caps, vocab_size=1000)._merges)")
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "toy" / "pairs.jsonl")], cwd=ROOT,
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)]
    assert len(set(runs)) == 1 and len(runs[0]) > 1000


def test_training_stops_when_the_texts_run_out_of_pairs():
    trained = safeclip.Tokenizer.train(["ab ab ab"], vocab_size=5000)
    assert trained.vocab_size < 5000 and trained.eot_id == trained.vocab_size - 1


def test_training_rejects_a_vocabulary_smaller_than_its_alphabet():
    with pytest.raises(ValueError, match="at least 514"):
        safeclip.Tokenizer.train(TOY_CAPTIONS, vocab_size=300)


HF_TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_train_save_from_file_round_trip(tmp_path):
    trained = safeclip.Tokenizer.train(TOY_CAPTIONS, vocab_size=600)
    path = trained.save(tmp_path / "new_folder")
    assert sorted(p.name for p in path.parent.iterdir()) == HF_TOKENIZER_FILES  # no temp file left
    loaded = safeclip.Tokenizer.from_file(tmp_path / "new_folder")
    assert loaded.vocab_size == trained.vocab_size
    assert torch.equal(loaded(TOY_CAPTIONS), trained(TOY_CAPTIONS))
    trained.save(tmp_path / "new_folder")  # overwriting works too
    assert sorted(p.name for p in path.parent.iterdir()) == HF_TOKENIZER_FILES


def test_saved_folder_has_openais_tokenizer_files_with_the_context_length(tok, tmp_path):
    from transformers import CLIPTokenizer

    tok.save(tmp_path, context_length=24)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    expected = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}  # as in openai/clip-vit-large-patch14
    assert special == expected and {k: config[k] for k in expected} == expected
    assert config["model_max_length"] == 24
    hf = CLIPTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 24 and hf.pad_token_id == hf.eos_token_id == tok.eot_id
    assert hf.bos_token_id == tok.sot_id
    assert json.loads((tmp_path / "vocab.json").read_text()) == hf.get_vocab()
    texts = ["A photo of a cat, sitting on the mat!", "Zürich 🎉 " * 20]
    padded = hf(texts, padding="max_length", truncation=True)["input_ids"]  # EOT-padded to 24
    ours = tok(texts, context_length=24)
    for row, hf_row in zip(ours, padded):
        eot = row.tolist().index(tok.eot_id)
        assert hf_row[:eot + 1] == row[:eot + 1].tolist() and set(hf_row[eot:]) == {tok.eot_id}


@pytest.fixture(scope="module")
def saved_openai(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_openai")
    tok.save(folder)
    return folder


@pytest.mark.parametrize("kept", [["vocab.json", "merges.txt"], ["merges.txt"], ["tokenizer.json"],
                                  ["merges.txt", "vocab.json", "tokenizer_config.json", "special_tokens_map.json"]])
def test_folders_with_some_of_the_files_are_read(tok, saved_openai, tmp_path, kept):
    from transformers import CLIPTokenizer

    (tmp_path / "some").mkdir()
    for name in kept:
        (tmp_path / "some" / name).write_bytes((saved_openai / name).read_bytes())
    texts = varied_texts(50, seed=4)
    assert torch.equal(safeclip.Tokenizer.from_file(tmp_path / "some")(texts), tok(texts))
    if "vocab.json" in kept:  # transformers reads the plain files alone too, to the same ids
        hf = CLIPTokenizer.from_pretrained(tmp_path / "some")
        row = tok(texts[:1])[0]
        assert hf(texts[0])["input_ids"] == row[row != 0].tolist()


def test_a_broken_vocab_json_beside_merges_is_named(saved_openai, tmp_path):
    (tmp_path / "merges.txt").write_bytes((saved_openai / "merges.txt").read_bytes())
    (tmp_path / "vocab.json").write_text('["not", "a", "vocabulary"]')
    with pytest.raises(ValueError, match="merges.txt: vocab.json beside it is not a {token: id} object"):
        safeclip.Tokenizer.from_file(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input files
# ---------------------------------------------------------------------------------------------


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        safeclip.Tokenizer.from_file(tmp_path / "nope.txt.gz")


def test_folder_without_a_tokenizer_is_rejected(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")  # settings alone are no tokenizer
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, merges.txt, bpe_simple_vocab_16e6.txt.gz"):
        safeclip.Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\x1f\x8b\x08\x00garbage", "damaged gzip"),
    (gzip.compress(b"#version\n" + b"a b\n" * 3)[:-12], "damaged gzip"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not UTF-8"),
    (b'{"model": {"type": "BPE", "vocab": {}', "invalid JSON at line 1"),
    (b'{"model": {"type": "WordPiece", "vocab": {}}}', "not a BPE tokenizer.json"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "end_of_word_suffix": null}}',
     "end_of_word_suffix is None, expected '</w>'"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "end_of_word_suffix": "</w>"}}',
     "vocabulary has no <|startoftext|> or <|endoftext|>"),
    (b'{"model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "<|startoftext|>": 1}, "merges": [],'
     b' "end_of_word_suffix": "</w>"}}', "must have the highest id"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, "merges": [["a", "b"]],'
     b' "end_of_word_suffix": "</w>"}}', "merge 0 .* not in the vocabulary"),
    (b'{"model": {"type": "BPE", "vocab": {"a b": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, "merges": [],'
     b' "end_of_word_suffix": "</w>"}}', "not made of byte-level BPE characters"),
    (b"#version: 0.2\nh e\nthis line has three\n", "line 3: expected a merge"),
    (b"#version: 0.2\nab cd\n", "merge 0 .* not in the vocabulary"),
    (b"#version: 0.2\n", "no BPE merges"),
    (b"", "no BPE merges"),
])
def test_corrupt_files_give_errors_naming_file_and_problem(tmp_path, content, message):
    path = tmp_path / "broken_tokenizer"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        safeclip.Tokenizer.from_file(path)
    assert "broken_tokenizer" in str(error.value)
