"""Tokenizer spec: exact round trip for any string, single-id special tokens, one digit per token, hashing and
loading of foreign tokenizer.json files."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from nanoseek.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, train_tokenizer

WORDS = "the king queen crown sword love night day 42 1999 über naïve 東京 😀 ".split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(synthetic_docs(300), vocab_size=400)


TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n",
    "emoji 👩‍👩‍👧 and flags 🇫🇷 and 😀",
    "CJK 中文字符 日本語 한국어",
    "combining e\u0301 a\u0308 and precomposed é ä",
    "control \x00 \x01 \x1b[31m \x7f",
    "zero width \u200b\u200d and BOM \ufeff",
    "specials inline: <|bos|>x<think>y</think><answer>z</answer><|end|>",
    "digits 0123456789 and 3.14159",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact_on_tricky_strings(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_is_exact_for_any_string(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_round_trip_of_random_bytes_decoded_with_replacement(tok, data):
    text = data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_fixed_single_ids(tok):
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for name, i in tok.special_ids.items():
        assert tok.encode(name) == [i]
        assert tok.token_id(name) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_special_tokens_are_never_merged_with_neighbours(tok):
    ids = tok.encode("a<think>b</think>")
    assert tok.token_id("<think>") in ids and tok.token_id("</think>") in ids
    assert tok.decode(ids, skip_special=True) == "ab"


def test_digits_are_one_token_each(tok):
    for text in ["1234567890", "x1999y", " 42 "]:
        ids = tok.encode(text)
        digit_pieces = [tok.decode([i]) for i in ids if any(c.isdigit() for c in tok.decode([i]))]
        assert all(len(piece) == 1 for piece in digit_pieces), digit_pieces
        assert len(digit_pieces) == sum(c.isdigit() for c in text)


def test_bos_is_prepended_on_request(tok):
    assert tok.encode("the king", bos=True) == [tok.bos_id, *tok.encode("the king")]


def test_encode_batch_matches_encode(tok):
    texts = synthetic_docs(10, seed=1)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]


def test_vocab_size_is_respected_and_merges_compress(tok):
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    text = synthetic_docs(1, seed=2)[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_save_then_load_keeps_ids_and_hash(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tok.sha256 and len(tok.sha256) == 64
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    text = synthetic_docs(1, seed=3)[0]
    assert loaded.encode(text) == tok.encode(text)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left behind


def test_train_writes_out_path_and_stats(tmp_path):
    out = tmp_path / "tokenizer.json"
    tok = train_tokenizer(synthetic_docs(50), vocab_size=300, out_path=out, max_chars=1000)
    assert Tokenizer.load(out).sha256 == tok.sha256
    assert tok.train_stats["chars"] == 1000


def test_train_rejects_tiny_vocab_and_empty_corpus():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=200)
    with pytest.raises(ValueError, match="no documents"):
        train_tokenizer([], vocab_size=300)


def _raw_bpe(specials: list[str]) -> HFTokenizer:
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    raw.train_from_iterator(synthetic_docs(100), trainer)
    return raw


def test_load_foreign_tokenizer_without_our_specials(tmp_path):
    path = tmp_path / "tokenizer.json"
    _raw_bpe([]).save(str(path))
    tok = Tokenizer.load(path)
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id is None and tok.special_ids == {}
    assert tok.encode("the king")  # plain encoding still works
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("the king", bos=True)


def test_load_finds_deepseek_style_bos_and_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    _raw_bpe(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]).save(str(path))
    tok = Tokenizer.load(path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert set(tok.special_ids) == {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"}


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(bad)
