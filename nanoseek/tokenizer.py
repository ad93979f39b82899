"""Byte-level BPE tokenizer: train one with Hugging Face `tokenizers`, or load any `tokenizer.json`.

Training (`train_tokenizer`) builds the same kind of tokenizer GPT-2 and DeepSeek-V3 use: text is split into
pieces by a regex, each piece is mapped byte by byte onto 256 printable characters (ByteLevel), and BPE merges
are learned over those characters. Because every byte has a symbol, any string encodes and decodes back to
exactly itself: there is no unknown token and no normalization.

Two choices a reader may not expect:
- Digits are split one per token (DeepSeek-V3 and LLaMA do the same): "1234" is four tokens, so the model
  sees place value directly instead of learning arbitrary merges such as "12" + "34".
- The chat and reasoning markers (`<|user|>`, `<think>`, `<answer>`, ...) are *special* tokens: each is a
  single id, never merged with neighbours and never split. The same strings inside user text encode to those
  ids too, so data that writes `<think>` literally gets the marker, as R1-style training data expects.

`Tokenizer.load` accepts any `tokenizer.json`, including a released DeepSeek one; BOS/EOS/PAD are then found by
their common names (`<｜begin▁of▁sentence｜>` ...) or are None. `Tokenizer.sha256` hashes the exact JSON bytes,
so prepared token shards can record which tokenizer made them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"  # END closes a chat turn
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
# Order fixes their ids (0..10) in every tokenizer we train.
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END, THINK, END_THINK, ANSWER, END_ANSWER]

# Names other tokenizers use for the same roles, tried in order by `Tokenizer.load`.
_BOS_NAMES = [BOS, "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"]
_EOS_NAMES = [EOS, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"]
_PAD_NAMES = [PAD, "<｜▁pad▁｜>", "<pad>", "<|padding|>"]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or parsed, or a tokenizer lacking a token we need."""


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` that knows its special ids and the hash of its JSON."""

    def __init__(self, backend: HFTokenizer, json_bytes: bytes | None = None):
        self.backend = backend
        # The bytes we hash are the bytes `save` writes, so a saved-then-loaded tokenizer keeps its hash.
        self._json = json_bytes if json_bytes is not None else backend.to_str(pretty=True).encode("utf-8")
        self.sha256 = hashlib.sha256(self._json).hexdigest()
        vocab = backend.get_vocab(with_added_tokens=True)
        # Ids of a released tokenizer need not be contiguous; an embedding table must cover the largest one.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids: dict[str, int] = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.bos_id = self._first_id(_BOS_NAMES)
        self.eos_id = self._first_id(_EOS_NAMES)
        self.pad_id = self._first_id(_PAD_NAMES)
        self.train_stats: dict | None = None  # set by train_tokenizer: seconds, docs, chars

    def _first_id(self, names: list[str]) -> int | None:
        for name in names:
            i = self.backend.token_to_id(name)
            if i is not None:
                return i
        return None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer ({e.strerror or e})") from e
        try:
            backend = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(backend, data)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically: a crash never leaves a truncated file under the final name."""
        atomic_write_bytes(Path(path), self._json)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # add_special_tokens=False: a loaded tokenizer's own post-processor must not add a second BOS.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self._require_bos(), *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """Encode many texts in one call; the Rust side spreads them over all cores."""
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        if not bos:
            return [e.ids for e in encodings]
        b = self._require_bos()
        return [[b, *e.ids] for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        # Keeping special tokens by default makes decode(encode(s)) == s for every string s.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        """The id of one token string (e.g. "<think>"), or None if the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def _require_bos(self) -> int:
        if self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token (none of: " + ", ".join(_BOS_NAMES) + ")")
        return self.bos_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, sha256={self.sha256[:12]})"


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    out_path: str | Path | None = None,
    max_chars: int | None = None,
) -> Tokenizer:
    """Learn a byte-level BPE with our special tokens from an iterable of documents.

    vocab_size counts the 256 byte symbols and the special tokens; merges fill the rest (a small corpus may
    run out of pairs to merge and give fewer). `max_chars` stops reading after that many characters, since
    BPE merges settle long before a many-GB corpus ends. The tokenizer is saved to `out_path` if given.
    """
    n_fixed = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= n_fixed:
        raise ValueError(
            f"vocab_size must exceed {n_fixed} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # add_prefix_space=False keeps the round trip exact: nothing is inserted before the text.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones the corpus lacks
        show_progress=False,
    )
    counted = _CountingIterator(docs, max_chars)
    start = time.perf_counter()
    backend.train_from_iterator(counted, trainer)
    if counted.n_docs == 0:
        raise ValueError("no documents to train the tokenizer on")
    tok = Tokenizer(backend)
    tok.train_stats = {
        "seconds": time.perf_counter() - start,
        "docs": counted.n_docs,
        "chars": counted.n_chars,
    }
    if out_path is not None:
        tok.save(out_path)
    return tok


class _CountingIterator:
    """Passes documents through, counting them and stopping once `max_chars` characters have gone by."""

    def __init__(self, docs: Iterable[str], max_chars: int | None):
        self.docs, self.max_chars = iter(docs), max_chars
        self.n_docs = self.n_chars = 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            if self.max_chars is not None and self.n_chars >= self.max_chars:
                return
            if self.max_chars is not None:
                doc = doc[: self.max_chars - self.n_chars]
            self.n_docs += 1
            self.n_chars += len(doc)
            yield doc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
