"""One sweep run in its own process: `python -m nanoseek.scaling.worker RUN_DIR [--threads N]`.

The sweep runner (`sweep.py`) writes RUN_DIR/spec.json and starts this module as a child process; it trains that
one config with the real trainer (`nanoseek.train`) and writes RUN_DIR/result.json only when the run finished
(or diverged), so a result file on disk always means "done". Exit status: 0 done, 1 crashed (the traceback is in
the log the runner keeps), 3 interrupted (SIGINT/SIGTERM: the trainer saved a checkpoint and the next sweep
resumes it bit-identically).

The validation set is the same for every run whatever its batch size: all of val.bin, once (evaluation batches
cover every window), scored once at the end of training in bits per UTF-8 byte (DeepSeek LLM §3 measures
"generalization error" as bits-per-byte on held-out data).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

EXIT_CRASHED, EXIT_INTERRUPTED = 1, 3


def run(spec: dict, run_dir: Path, log=print) -> dict:
    """Train the run described by `spec` in `run_dir` (resuming a checkpoint there) and return its result."""
    from nanoseek.config import ModelConfig
    from nanoseek.train.run import build_trainer, prepare_data
    from nanoseek.train.trainer import TrainConfig

    t0 = time.time()
    prepared = prepare_data(spec["data"], None, spec["vocab_size"], log=log, progress=False)
    val_windows = (prepared.manifest["splits"]["val"]["tokens"] - 1) // spec["seq_len"]
    steps = spec["steps"]
    tcfg = TrainConfig(
        out=str(run_dir),
        seq_len=spec["seq_len"],
        batch_size=spec["batch_size"],
        steps=steps,
        lr=spec["lr"],
        warmup_steps=spec["warmup_steps"],
        eval_every=steps,  # score once, at the end
        eval_batches=max(1, math.ceil(val_windows / spec["batch_size"])),  # all of val.bin
        ckpt_every=max(steps // 4, 1),
        keep_last=1,
        seed=spec["seed"],
        device=spec.get("device", "auto"),
    )
    trainer = build_trainer(ModelConfig.from_dict(spec["model"]), tcfg, prepared, log=log, progress=False)
    trainer.resume()
    result = trainer.fit()
    if result["status"] == "interrupted":
        return result
    if result["status"] == "finished" and "val_bpb" not in result:
        result.update(trainer.run_eval())  # resumed at the last step: nothing left to train, only to score
    shutil.rmtree(
        run_dir / "checkpoints", ignore_errors=True
    )  # a finished run is its result; keep disk small
    return {
        "status": result["status"],
        "val_loss": result.get("val_loss"),
        "val_bpb": result.get("val_bpb"),
        "steps": result["step"],
        "tokens": result["tokens"],
        "train_seconds": round(trainer.train_seconds, 2),
        "wall_seconds": round(time.time() - t0, 2),
        "tok_s": round(result["tokens"] / max(trainer.train_seconds, 1e-9), 1),
        "device": str(trainer.device),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoseek.scaling.worker")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this run")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = json.loads((args.run_dir / "spec.json").read_text())
    result = run(spec, args.run_dir, log=lambda *a: print(*a, flush=True))
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    tmp = args.run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.run_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
