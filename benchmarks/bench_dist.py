"""Distributed training on CPU: scaling efficiency 1 -> 2 processes, and all-to-all bytes per step.

Issue 8 §3. Weak scaling: every rank trains on the same per-rank batch, one thread each, so one process with
one thread is "one device" and two processes on the two cores are two devices joined by gloo over loopback:
    efficiency = tokens/s of 2 ranks / (2 x tokens/s of 1 rank)
`--two-threads` adds one process with two threads (how nanoseek trains without torchrun); on a busy shared
2-core machine its OpenMP threads wait for each other and it runs up to ~20x slower, so it is off by default.
Modes: data parallel over DDP or FSDP2, expert parallel (--ep 2) over either. Each configuration is one
`mp.spawn` (or one in-process run) of the real Trainer; step times are rank 0's, the median over the timed
steps; rounds repeat the whole list so that a slow spell of the shared machine hits every configuration.

All-to-all bytes: the trainer's own count (`a2a_bytes` in metrics.jsonl: bytes leaving each rank for the
dispatch and combine, forward and backward, summed over ranks) next to the expectation for uniform routing
(K_r (ep-1)/ep remote rows per token, `expert_parallel.expected_remote_rows`). The V3 table is the same
accounting at full scale (`expert_parallel.a2a_bytes_per_token`), used in docs/distributed.md.

    python benchmarks/bench_dist.py            # ~3-5 minutes on 2 cores
    python benchmarks/bench_dist.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine_info  # noqa: E402

from nanoseek.config import get_preset  # noqa: E402
from nanoseek.data import TokenLoader  # noqa: E402
from nanoseek.dist import Parallel  # noqa: E402
from nanoseek.expert_parallel import a2a_bytes_per_token, expected_remote_rows  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.train.trainer import TrainConfig, Trainer  # noqa: E402

CONFIGS = [  # name, processes, threads per process, ep, dp
    ("1 process, 1 thread", 1, 1, 1, None),
    ("2 ranks DDP", 2, 1, 1, "ddp"),
    ("2 ranks FSDP2", 2, 1, 1, "fsdp"),
    ("2 ranks EP2 + DDP", 2, 1, 2, "ddp"),
    ("2 ranks EP2 + FSDP2", 2, 1, 2, "fsdp"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, tmp: Path, name: str, parallel: Parallel | None) -> dict:
    cfg = get_preset(args.preset).replace(vocab_size=args.vocab)
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    loader = TokenLoader(
        tmp / "tokens.bin", args.batch, args.seq, seed=0, dtype="uint16", rank=rank, world_size=world
    )
    steps = args.warmup + args.steps
    tc = TrainConfig(
        out=str(tmp / name), seq_len=args.seq, batch_size=args.batch, steps=steps, warmup_steps=1
    )
    trainer = Trainer(cfg, tc, loader, None, log=lambda *a: None, progress=False, parallel=parallel)
    recs = [trainer.train_step() for _ in range(steps)][args.warmup :]
    return {
        "dt": [r["dt"] for r in recs],
        "tokens_per_step": tc.tokens_per_step,
        "a2a_bytes": [r.get("a2a_bytes", 0) for r in recs],
        "loss": recs[-1]["loss"],
    }


def _worker(rank: int, args, tmp: Path, name: str, ep: int, dp: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = _run(args, tmp, name.replace(" ", "_"), Parallel.from_env(ep=ep, dp=dp, timeout_s=300))
    if rank == 0:
        (tmp / "result.json").write_text(json.dumps(result))
    Parallel.from_env().close()


def measure(args, tmp: Path, name: str, procs: int, threads: int, ep: int, dp: str | None) -> dict:
    if procs == 1:
        torch.set_num_threads(threads)
        return _run(args, tmp, name.replace(" ", "_"), None)
    (tmp / "result.json").unlink(missing_ok=True)
    mp.spawn(_worker, args=(args, tmp, name, ep, dp, _free_port()), nprocs=procs)
    return json.loads((tmp / "result.json").read_text())


def v3_table() -> None:
    v3 = get_preset("deepseek-v3")
    print("\nDeepSeek-V3 all-to-all per token per MoE layer, forward (expert_parallel.a2a_bytes_per_token):")
    rows = [
        ("one row per selected expert, BF16 both ways", a2a_bytes_per_token(v3, 8, 2, 2)),
        ("one row per selected expert, FP8 dispatch / BF16 combine", a2a_bytes_per_token(v3, 8, 1, 2)),
        ("node-limited (<= 4 nodes), FP8 dispatch / BF16 combine", a2a_bytes_per_token(v3, 4, 1, 2)),
    ]
    print(f"  {'scheme':60s} {'dispatch B':>11s} {'combine B':>10s} {'total B':>9s} {'x58 layers':>11s}")
    for label, b in rows:
        print(
            f"  {label:60s} {b['dispatch']:11,.0f} {b['combine']:10,.0f} {b['total']:9,.0f} "
            f"{b['per_token_all_layers'] / 1e6:9.2f} MB"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny preset, 1 round, 3 steps")
    p.add_argument("--two-threads", action="store_true", help="also time 1 process with 2 threads")
    args = p.parse_args()
    if args.two_threads:
        CONFIGS.insert(1, ("1 process, 2 threads", 1, 2, 1, None))
    if args.quick:
        args.preset, args.vocab, args.seq, args.steps, args.rounds = "tiny", 512, 64, 3, 1
    print("bench_dist: scaling 1 -> 2 processes on CPU (gloo, loopback)")
    print_machine_info()
    cfg = get_preset(args.preset)
    print(
        f"  model {args.preset} (d={cfg.hidden_size}, {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}),"
        f" vocab {args.vocab}, seq {args.seq}, {args.batch} sequences per rank, fp32, {args.steps} timed steps"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        np.random.default_rng(0).integers(0, args.vocab, 400_000).astype(np.uint16).tofile(tmp / "tokens.bin")
        dts: dict[str, list[float]] = {c[0]: [] for c in CONFIGS}
        info: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, procs, threads, ep, dp in CONFIGS:
                t0 = time.perf_counter()
                res = measure(args, tmp, name, procs, threads, ep, dp)
                dts[name].append(statistics.median(res["dt"]))
                info[name] = res
                print(
                    f"  .. {name}: {statistics.median(res['dt']) * 1e3:.0f} ms/step ({time.perf_counter() - t0:.0f} s)"
                )
    base = args.batch * args.seq / min(dts[CONFIGS[0][0]])
    print(
        f"\n  {'configuration':24s} {'ms/step (median, best)':>24s} {'tokens/s':>9s} {'vs 1 thread':>11s} {'efficiency':>10s}"
    )
    for name, procs, _threads, _ep, _dp in CONFIGS:
        med, best = statistics.median(dts[name]), min(dts[name])
        tok_s = info[name]["tokens_per_step"] / best
        eff = tok_s / (procs * base) if procs > 1 else float("nan")
        eff_s = f"{eff:10.0%}" if procs > 1 else f"{'-':>10s}"
        print(f"  {name:24s} {med * 1e3:11.0f} {best * 1e3:11.0f} {tok_s:9.0f} {tok_s / base:10.2f}x {eff_s}")
    ep_cfg = get_preset(args.preset)
    for name in ("2 ranks EP2 + DDP", "2 ranks EP2 + FSDP2"):
        measured = statistics.median(info[name]["a2a_bytes"])
        # 2 ranks x tokens per rank x MoE layers (the MTP block is one, on T-1 positions) x remote rows x
        # (dispatch + combine) x (forward + backward) x fp32 row
        tokens = 2 * args.batch * args.seq * ep_cfg.n_moe_layers
        tokens += 2 * args.batch * (args.seq - 1) * ep_cfg.num_nextn_predict_layers
        expected = tokens * expected_remote_rows(ep_cfg, 2) * 2 * 2 * ep_cfg.hidden_size * 4
        print(
            f"  all-to-all bytes per step, {name}: {measured / 1e6:.2f} MB measured "
            f"(uniform routing would give {expected / 1e6:.2f} MB; count exchange included in measured)"
        )
    # Why EP scales better here: DP all-reduces every gradient, EP only the non-expert ones (each expert's
    # gradient stays on its rank) and moves activations instead. Ring all-reduce over 2 ranks: each rank
    # sends 2 (W-1)/W = 1 x the fp32 gradient bytes.
    with torch.device("meta"):
        model = Transformer(ep_cfg.replace(vocab_size=args.vocab))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(
        f"  gradient all-reduce bytes per rank per step (computed): DP {total * 4 / 1e6:.1f} MB; "
        f"EP2 {(total - experts) * 4 / 1e6:.1f} MB (+ its all-to-all, above, / 2 per rank)"
    )
    v3_table()


if __name__ == "__main__":
    main()
