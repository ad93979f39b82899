"""One pretraining run from the command line's point of view: data -> tokenizer -> shards -> Trainer.

Tokenizers and token shards are cached per corpus (keyed by the corpus fingerprint, the vocabulary size and
the tokenizer hash) under the nanoseek cache, so ablations and re-runs on the same data skip both steps.
The model's vocab_size is set to the tokenizer's, so a preset's vocab_size is only a default.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.config import ModelConfig
from nanoseek.data import (
    DataError,
    TokenLoader,
    cache_dir,
    eval_batches,
    load_manifest,
    open_data,
    prepare,
    shards_intact,
)
from nanoseek.sample import generate
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.trainer import TrainConfig, Trainer

TOKENIZER_TRAIN_CHARS = 20_000_000  # BPE merges settle long before a big corpus ends


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    data_dir: Path
    manifest: dict[str, Any]

    @property
    def bytes_per_token(self) -> float:
        val = self.manifest["splits"]["val"]
        return val["bytes"] / max(val["tokens"], 1)


def prepare_data(
    data: str, tokenizer: str | None, vocab_size: int, log=print, progress: bool = True
) -> PreparedData:
    if (Path(data) / "manifest.json").is_file():
        return _prepared_folder(Path(data), tokenizer, log)
    source = open_data(data)
    key = source.fingerprint()[:16]
    if tokenizer:
        tok_path = Path(tokenizer)
        tok = Tokenizer.load(tok_path)
    else:
        tok_path = cache_dir() / "tokenizers" / f"{key}-v{vocab_size}.json"
        if tok_path.exists():
            tok = Tokenizer.load(tok_path)
        else:
            log(f"training a {vocab_size}-token BPE tokenizer on {source.describe()}")
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            tok = train_tokenizer(source.documents(), vocab_size, tok_path, max_chars=TOKENIZER_TRAIN_CHARS)
    data_dir = cache_dir() / "tokens" / f"{key}-{tok.sha256[:12]}"
    manifest = prepare(source, tok, data_dir, progress=progress)
    split = manifest["splits"]
    log(
        f"data: {manifest['source']}: {split['train']['tokens']:,} train / {split['val']['tokens']:,} val tokens"
    )
    return PreparedData(tok, tok_path, data_dir, manifest)


def _prepared_folder(data_dir: Path, tokenizer: str | None, log) -> PreparedData:
    """A `nanoseek prepare` output used as it is: the tokenizer must be the one it was prepared with."""
    manifest = load_manifest(data_dir)
    if not tokenizer:
        raise DataError(f"{data_dir}: a prepared folder; give the --tokenizer it was prepared with")
    tok = Tokenizer.load(tokenizer)
    if tok.sha256 != manifest.get("tokenizer_sha256"):
        raise DataError(f"{data_dir}: prepared with another tokenizer than {tokenizer} (sha256 differs)")
    if not shards_intact(data_dir, manifest):
        raise DataError(f"{data_dir}: token shards missing or truncated; run `nanoseek prepare` again")
    split = manifest["splits"]
    log(
        f"data: {data_dir} (prepared): {split['train']['tokens']:,} train / {split['val']['tokens']:,} val tokens"
    )
    return PreparedData(tok, Path(tokenizer), data_dir, manifest)


def build_trainer(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    prepared: PreparedData,
    log=print,
    progress: bool = True,
    parallel=None,
) -> Trainer:
    """parallel: a nanoseek.dist.Parallel under torchrun; each rank then reads its slice of the global batch."""
    model_cfg = model_cfg.replace(vocab_size=prepared.tokenizer.vocab_size)
    rank, world_size = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    train_cfg.validate(model_cfg, world_size)
    loader = TokenLoader(
        prepared.data_dir / "train.bin",
        train_cfg.batch_size,
        train_cfg.seq_len,
        train_cfg.seed,
        rank=rank,
        world_size=world_size,
    )

    def val_batches():
        return eval_batches(
            prepared.data_dir / "val.bin", train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches
        )

    run_dir = Path(train_cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        shutil.copyfile(prepared.tokenizer_path, run_dir / "tokenizer.json")
    return Trainer(
        model_cfg,
        train_cfg,
        loader,
        val_batches,
        tokenizer_path=run_dir / "tokenizer.json",
        bytes_per_token=prepared.bytes_per_token,
        log=log,
        progress=progress,
        parallel=parallel,
    )


def sampler(tokenizer: Tokenizer, prompt: str = "\n", max_new_tokens: int = 48):
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []

    def sample(model) -> str:
        ids = generate(
            model, bos + tokenizer.encode(prompt), max_new_tokens, temperature=0.8, top_k=50, seed=0
        )
        model.train()
        return prompt + tokenizer.decode(ids)

    return sample
