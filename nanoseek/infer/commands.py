"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`: the command line of the inference engine.

    nanoseek generate --model runs/speedrun --prompt "ROMEO:" [--json]
    nanoseek chat --model runs/speedrun                 # /reset starts over, /exit (or Ctrl-D) quits
    nanoseek serve --model runs/speedrun [--host 127.0.0.1] [--port 8000] [--api-key KEY]

--model takes a nanoseek run or checkpoint folder, or a Hugging Face DeepSeek-V3/V2 folder; the tokenizer is
the folder's tokenizer.json. The handlers import torch and the engine lazily, so `nanoseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nanoseek.argtypes import UsageError, fraction, non_negative_number, positive_int, positive_number


def add_parsers(sub) -> None:
    add_generate_parser(sub)
    add_chat_parser(sub)
    add_serve_parser(sub)


def _engine_flags(p) -> None:
    p.add_argument(
        "--model", required=True, metavar="PATH", help="run/checkpoint folder or Hugging Face folder"
    )
    p.add_argument(
        "--max-len", type=positive_int, help="context: prompt + new tokens (default min(model, 2048))"
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="MTP speculative decoding (greedy: the same tokens; sampling: the same distribution, not the same draw)",
    )
    p.add_argument(
        "--reference-decode",
        action="store_true",
        help="decode with the model's own forward instead of the lean step (nanoseek/infer/lean.py): same "
        "output, slower; for checking",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _sampling_flags(p, temperature: float, max_tokens: int) -> None:
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--max-tokens", type=positive_int, default=max_tokens, help=f"new tokens at most ({max_tokens})"
    )
    s.add_argument(
        "--temperature",
        type=non_negative_number,
        default=temperature,
        help=f"0 = greedy ({temperature})",
    )
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = off)")
    s.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument(
        "--repetition-penalty", type=positive_number, default=1.0, help="> 1 discourages repeats (1 = off)"
    )
    s.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _params(args, **extra):
    from nanoseek.infer.sampling import SamplingParams

    if args.top_k < 0:
        raise UsageError(f"argument --top-k: {args.top_k} must be >= 0")
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        **extra,
    ).validate()


def _load(args, max_batch: int = 1):
    from nanoseek.infer.engine import Engine, load

    model, tok = load(args.model, device=args.device)
    engine = Engine(
        model,
        tok,
        max_batch=max_batch,
        max_len=args.max_len,
        speculative=args.speculative,
        lean=not args.reference_decode,
    )
    return engine, tok


# ---- generate ----------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="one-shot generation from a prompt",
        description="Continue a prompt (or, with --chat, answer it as a user message) and print the result "
        "as it is generated; --json prints one JSON object with the text, tokens, usage and timing instead.",
    )
    _engine_flags(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--no-bos", action="store_true", help="do not start a plain prompt with BOS")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="with --json: per-token logprobs")
    _sampling_flags(p, temperature=0.8, max_tokens=128)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from nanoseek.infer.chat import encode_chat

    if args.logprobs is not None and not args.json:
        raise UsageError("argument --logprobs: needs --json (logprobs are part of the JSON output)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine, tok = _load(args)
    stop_ids: list[int] = []
    if args.chat:
        ids, stop_ids = encode_chat(tok, [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt, bos=tok.bos_id is not None and not args.no_bos)
    params = _params(args, stop_token_ids=stop_ids, logprobs=args.logprobs)
    start = time.perf_counter()
    req = None
    for delta in engine.stream(ids, params):
        req = delta.request
        if not args.json:
            print(delta.text, end="", flush=True)
    seconds = time.perf_counter() - start
    if not args.json:
        print()
        return 0
    out = {
        "prompt": prompt,
        "text": req.text,
        "finish_reason": req.finish_reason,
        "tokens": req.output,
        "usage": {
            "prompt_tokens": len(ids),
            "completion_tokens": req.num_generated,
            "total_tokens": len(ids) + req.num_generated,
        },
        "seconds": round(seconds, 4),
        "tokens_per_second": round(req.num_generated / seconds, 2) if seconds > 0 else None,
    }
    if args.speculative:
        out["speculative"] = {
            "drafts": engine.stats.draft_tokens,
            "accepted": engine.stats.accepted_tokens,
            "acceptance_rate": round(engine.stats.acceptance_rate, 4),
        }
    if args.logprobs is not None:
        out["logprobs"] = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in req.logprobs]
    print(json.dumps(out, ensure_ascii=False))
    return 0


# ---- chat --------------------------------------------------------------------------------------------------
DIM, RESET = "\033[2m", "\033[0m"


def add_chat_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat (streaming; /reset, /exit)",
        description="Chat with a model through its chat template. Replies stream as they are generated; "
        "<think> sections are shown dimmed (or marked 'thinking:' without colour). /reset forgets the "
        "conversation, /exit or Ctrl-D quits.",
    )
    _engine_flags(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours (default: colour on a terminal)")
    _sampling_flags(p, temperature=0.7, max_tokens=512)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from nanoseek.infer.chat import ThinkSplitter, encode_chat

    engine, tok = _load(args)
    color = sys.stdout.isatty() and not args.no_color
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print("nanoseek chat: /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(base)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text:
            continue
        if text.startswith("/") and " " not in text:  # a mistyped command is not a message for the model
            print(f"(unknown command {text}: /reset starts over, /exit quits)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids, stop_ids = encode_chat(tok, messages)
        room = engine.max_len - len(ids)
        if room < 1:
            print("(the conversation no longer fits the context: /reset)", file=sys.stderr)
            messages.pop()
            continue
        params = _params(args, stop_token_ids=stop_ids)
        params.max_tokens = min(params.max_tokens, room)
        splitter, kind = ThinkSplitter(), "answer"
        sys.stdout.write("assistant> ")
        reply = ""
        for delta in engine.stream(ids, params):
            reply += delta.text
            for k, piece in splitter.feed(delta.text):
                kind = _show(k, piece, kind, color)
        for k, piece in splitter.flush():
            kind = _show(k, piece, kind, color)
        sys.stdout.write((RESET if color and kind == "think" else "") + "\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})


def _show(kind: str, piece: str, previous: str, color: bool) -> str:
    """Write one piece of a reply, switching style between thinking and answer; returns the kind written."""
    if kind != previous:
        if color:
            sys.stdout.write(DIM if kind == "think" else RESET)
        else:
            sys.stdout.write("[thinking] " if kind == "think" else "\n[answer] ")
    sys.stdout.write(piece)
    sys.stdout.flush()
    return kind


# ---- serve -------------------------------------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a chat page",
        description="Serve the model over HTTP: /v1/models, /v1/completions, /v1/chat/completions (streaming "
        "with stream: true), /health, /metrics, and a chat page at /. See nanoseek/infer/server.py.",
    )
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", default=None, help="the name clients send (default: the folder name)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="cache slots = concurrent requests (8)")
    p.add_argument(
        "--max-queue", type=int, default=32, help="requests waiting beyond that; more get 429 (32)"
    )
    p.add_argument("--request-timeout", type=positive_number, default=600.0, help="seconds per request (600)")
    p.set_defaults(func=cmd_serve)


def _check_listen(host: str, port: int) -> None:
    """Fail with one line before loading the model if HOST:PORT cannot be listened on (in use, bad host)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(addr)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from nanoseek.infer.server import serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"argument --port: {args.port} is not a port number")
    if args.max_queue < 0:
        raise UsageError(f"argument --max-queue: {args.max_queue} must be >= 0")
    _check_listen(args.host, args.port)
    serve(
        args.model,
        args.host,
        args.port,
        model_name=args.model_name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_len=args.max_len,
        speculative=args.speculative,
        lean=not args.reference_decode,
        request_timeout=args.request_timeout,
        device=args.device,
    )
    return 0
