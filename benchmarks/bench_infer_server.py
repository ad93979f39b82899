"""Server load: N concurrent streaming chat clients against `nanoseek serve` on loopback, for a bounded time.

    python benchmarks/bench_infer_server.py                # 4, 16 and 32 clients, 20 s each
    python benchmarks/bench_infer_server.py --quick        # smoke run

The server is the real command (`python -m nanoseek serve`) in its own process; the clients are threads here,
each sending streaming /v1/chat/completions requests back to back until the time is up (a request still running
then is finished, not cut). The server has `--max-batch` cache slots and a queue of `--max-queue`; with more
clients than slots + queue, the extra requests must be refused at once with 429 + Retry-After (the client then
waits that long and tries again). Reported per load level: requests completed and refused, anything else (must
be 0: no 5xx, no broken stream, no hang), generated tokens per second over the whole run, latency p50/p99 of a
completed request and its time to first token, and what /metrics says afterwards (nothing left running).

The model: --model DIR, else runs/bench_infer_spec (bench_infer_spec.py's trained speedrun model) if present,
else a random `tiny`-preset model with a small tokenizer (the server's work per token is the same).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import print_machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_folder(args, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    trained = ROOT / "runs" / "bench_infer_spec"
    if (trained / "checkpoints").is_dir():
        return trained
    import nanoseek
    from nanoseek.config import get_preset
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import train_tokenizer

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 50
    tok = train_tokenizer([text], vocab_size=512)
    nanoseek.save_hf(Transformer(get_preset("tiny").replace(vocab_size=512)), tmp)
    tok.save(tmp / "tokenizer.json")
    return tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body


def one_request(port: int, model: str, max_tokens: int, seed: int, tally: Tally) -> float:
    """Send one streaming chat request and record it; returns seconds to wait before the next one."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Speak, and tell me of the king."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, usage = None, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 429:
            retry = float(resp.getheader("Retry-After", "1"))
            resp.read()
            with tally.lock:
                tally.refused += 1
            return retry
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
        done = False
        for raw in resp:
            line = raw.decode().strip()
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if event["choices"] and event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
        conn.close()
        if not done or usage is None:
            raise RuntimeError("stream ended without usage and [DONE]")
    except Exception as e:  # anything but a clean completion or a clean refusal is a failure
        with tally.lock:
            tally.failures.append(f"{type(e).__name__}: {e}")
        return 0.5
    with tally.lock:
        tally.latencies.append(time.perf_counter() - start)
        if ttft is not None:
            tally.ttfts.append(ttft)
        tally.tokens += usage["completion_tokens"]
    return 0.0


def load_level(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            wait = one_request(port, model, max_tokens, seed=1000 * i + n, tally=tally)
            n += 1
            if wait:
                time.sleep(min(wait, max(0.0, deadline - time.perf_counter())))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    return tally, time.perf_counter() - start


def metrics(port: int) -> dict[str, float]:
    _, text = get(port, "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", default="4,16,32")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server process (1)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds, args.max_tokens = "2,12", 4.0, 16
    print("bench_infer_server: concurrent streaming clients against `nanoseek serve` on loopback")
    print_machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args, Path(tmp))
        port, name = free_port(), "bench"
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(folder), "--port", str(port)]
        cmd += ["--model-name", name, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if get(port, "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
            print(f"  model {folder}, --max-batch {args.max_batch} --max-queue {args.max_queue}, "
                  f"{args.max_tokens} new tokens per request, {args.seconds:g} s per level\n")  # fmt: skip
            print(f"{'clients':>7} | {'done':>5} | {'429':>5} | {'other':>5} | {'tok/s':>6} | {'req/s':>5} | "
                  f"{'p50 s':>6} | {'p99 s':>6} | {'TTFT p50':>8} | {'TTFT p99':>8} | left running")  # fmt: skip
            for n in [int(c) for c in args.clients.split(",")]:
                before = metrics(port)
                tally, wall = load_level(port, name, n, args.seconds, args.max_tokens)
                time.sleep(0.5)
                after = metrics(port)
                served = (
                    after["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"]
                )
                left = after["nanoseek_running_requests"] + after["nanoseek_queue_depth"]
                print(
                    f"{n:>7} | {len(tally.latencies):>5} | {tally.refused:>5} | {len(tally.failures):>5} | "
                    f"{tally.tokens / wall:>6.0f} | {len(tally.latencies) / wall:>5.1f} | "
                    f"{pct(tally.latencies, 0.5):>6.2f} | {pct(tally.latencies, 0.99):>6.2f} | "
                    f"{pct(tally.ttfts, 0.5):>8.3f} | {pct(tally.ttfts, 0.99):>8.3f} | {left:.0f}",
                    flush=True,
                )
                if tally.failures:
                    print("    failures:", *sorted(set(tally.failures))[:5], sep="\n      ")
                if served != tally.tokens:
                    print(f"    note: server counted {served:.0f} tokens, clients {tally.tokens}")
            m = metrics(port)
            outcome = {
                o: m[f'nanoseek_requests_total{{outcome="{o}"}}'] for o in ("finished", "rejected", "failed")
            }
            print(
                f"\n/metrics at the end: finished {outcome['finished']:.0f}, rejected {outcome['rejected']:.0f}, "
                f"failed {outcome['failed']:.0f}, cache slots used {m['nanoseek_cache_slots_used']:.0f}/"
                f"{m['nanoseek_cache_slots_total']:.0f}"
            )
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
