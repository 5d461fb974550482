"""fastlm.data.Tokenizer: training, special tokens, lossless round trips, save/load."""

from __future__ import annotations

import json
import random

import pytest

from fastlm.data import NUM_SENTINELS, SPECIAL_TOKENS, Tokenizer

TRICKY = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs\n\nand newlines\r\n",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "CJK 世界 日本語 한국어",
    "mixed: Ünïcödé, combining e\u0301, zero\u200bwidth, RTL שלום",
    "\x00 control \x7f chars \x1b[0m",
    "def f(x):\n    return x ** 2  # code\n",
    "<|endoftext|> between <mask> special <extra_id_7> tokens",
]


def test_special_tokens_come_first(tokenizer):
    assert len(SPECIAL_TOKENS) == 5 + NUM_SENTINELS == 105
    assert SPECIAL_TOKENS[:5] == ("<|endoftext|>", "<pad>", "<mask>", "<cls>", "<sep>")
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = (tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id)
    assert ids == (0, 1, 2, 3) and tokenizer.sep_id == 4
    assert tokenizer.sentinel_ids == [tokenizer.token_id(f"<extra_id_{k}>") for k in range(100)]
    assert tokenizer.sentinel_ids == list(range(5, 105))
    assert tokenizer.special_ids == frozenset(range(105))
    assert tokenizer.vocab_size == 600
    assert tokenizer.token_id("no such token here") is None


def test_lossless_round_trip(tokenizer, fresh_seed):
    rng = random.Random(fresh_seed)
    # Random code points from the whole range, surrogates excluded (not encodable).
    randoms = [
        "".join(
            chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xE000, 0x10FFFF)]))
            for _ in range(rng.randrange(1, 40))
        )
        for _ in range(50)
    ]
    for text in TRICKY + randoms:
        ids = tokenizer.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text, repr(text)


def test_encode_batch_matches_encode(tokenizer, corpus):
    texts = TRICKY + corpus[300:320]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch([]) == []


def test_encoding_adds_no_special_tokens_and_decoding_keeps_them(tokenizer):
    assert tokenizer.encode("hello") == tokenizer.encode_batch(["hello"])[0]
    assert not set(tokenizer.encode("hello world")) & tokenizer.special_ids
    # The text of a special token encodes to that token.
    assert tokenizer.encode("<mask>") == [tokenizer.mask_id]
    ids = [tokenizer.sentinel_ids[0], *tokenizer.encode(" x"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<extra_id_0> x<|endoftext|>"


def test_merges_compress_text(tokenizer, corpus):
    text = "\n".join(corpus[300:320])
    # Held-out stdlib prose: byte-level BPE at 600 tokens gets well under one token a byte.
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_training_is_deterministic(corpus, tmp_path):
    a = Tokenizer.train(corpus[:200], 500)
    b = Tokenizer.train(iter(corpus[:200]), 500)  # same texts, from a one-shot iterator
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    model_a = json.loads((tmp_path / "a.json").read_text())["model"]
    model_b = json.loads((tmp_path / "b.json").read_text())["model"]
    assert model_a["vocab"] == model_b["vocab"]
    assert model_a["merges"] == model_b["merges"]
    assert len(model_a["vocab"]) == 500


def test_save_load(tokenizer, corpus, tmp_path):
    path = tmp_path / "new" / "dir" / "tokenizer.json"
    tokenizer.save(path)
    assert path.is_file()
    for loaded in (Tokenizer.load(path), Tokenizer.load(str(path.parent))):
        texts = TRICKY + corpus[300:310]
        assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
        assert loaded.special_ids == tokenizer.special_ids
        assert loaded.sentinel_ids == tokenizer.sentinel_ids
        assert loaded.vocab_size == tokenizer.vocab_size


def test_tokenizer_without_our_special_tokens(foreign_tokenizer, tmp_path):
    gpt2_like = foreign_tokenizer(["<|endoftext|>"])
    gpt2_like.save(tmp_path / "tokenizer.json")
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.eos_id == 0
    assert (tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id) == (None,) * 4
    assert tok.sentinel_ids == []
    assert tok.special_ids == frozenset({0})
    assert tok.require("<|endoftext|>", "packing") == 0
    with pytest.raises(ValueError, match=r"no <mask> token \(needed for masked-LM\)"):
        tok.require("<mask>", "masked-LM")
    assert tok.decode(tok.encode("a small corpus")) == "a small corpus"


def test_train_errors(corpus):
    with pytest.raises(ValueError, match="vocab_size must exceed 361"):
        Tokenizer.train(corpus[:10], 361)
    with pytest.raises(TypeError, match="vocab_size"):
        Tokenizer.train(corpus[:10], 600.0)
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train(corpus[:10], 600, min_frequency=0)
    with pytest.raises(TypeError, match="texts"):
        Tokenizer.train("a single string", 600)


def test_io_and_argument_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    with pytest.raises(TypeError, match="text"):
        tokenizer.encode(b"bytes")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenizer.encode_batch(["ok", None])
    with pytest.raises(ValueError, match="600"):
        tokenizer.decode([5, 600])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="tokenizer"):
        Tokenizer("not a tokenizer")


def test_loading_a_file_that_is_not_a_tokenizer_names_it(tmp_path):
    files = {
        "notes.txt": "plain text",
        "cut.json": '{"model": {"type": "BPE", ',
        "empty.json": "{}",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not a tokenizer.json file \("):
            Tokenizer.load(tmp_path / name)


def test_fingerprint_tells_tokenizers_that_map_text_to_other_ids(tokenizer, corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    same = Tokenizer.load(path)
    assert len(tokenizer.fingerprint()) == 64  # sha256, hex
    assert same.fingerprint() == tokenizer.fingerprint()
    assert same.difference(tokenizer) is None
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    token = {i: t for t, i in vocab.items()}
    a, b = token[300], token[301]  # two of the byte symbols (ids 105..360)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    swapped = Tokenizer.load(path)
    assert swapped.fingerprint() != tokenizer.fingerprint()
    assert swapped.difference(tokenizer) == f"id 300 is {b!r} here, {a!r} there"
    retrained = Tokenizer.train(corpus[:200], 600)  # other texts: other merges
    assert retrained.fingerprint() != tokenizer.fingerprint()
    assert retrained.difference(tokenizer) is not None
