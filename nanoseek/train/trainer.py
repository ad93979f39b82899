"""The pretraining loop: `nanoseek train`.

One optimizer step (DeepSeek-V3 §4.2 recipe, scaled down):
    for each micro-batch:  loss = L_main + lambda/D sum_k L_MTP^k + balance losses;  (loss / accum).backward()
    clip grad norm to 1.0; AdamW step with the scheduled LR
    aux-loss-free bias update from the whole step's expert counts (`Transformer.update_balance_bias`)
A non-finite loss or gradient norm skips the step (grads dropped, nothing saved) and is logged; too many in a
row stop the run without touching the last good checkpoint.

Everything a resumed run needs is in the checkpoint (weights, AdamW moments, LR-schedule position = the step,
RNG states, data-loader position, routing biases), so an interrupted-and-resumed run reproduces the loss sequence
of an uninterrupted one bit for bit on CPU. Ctrl-C / SIGTERM finish the current step, save, and exit.

Logs: a tqdm bar with ETA on stderr; `metrics.jsonl` (one JSON object per step, plus eval records) in the run dir;
MFU = achieved model FLOPs / peak, where model FLOPs = every matmul of the step (`accounting.count_flops().full`)
and the peak is measured on this CPU at start-up, or the GPU's datasheet bf16 number.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.accounting import count_flops
from nanoseek.config import ModelConfig
from nanoseek.fp8 import convert_to_fp8
from nanoseek.hardware import fast_matmul, fast_matmul_available, peak_flops
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
    start_run_dir,
    write_json_atomic,
)
from nanoseek.train.optim import SCHEDULES, lr_multiplier, make_optimizer

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


class TrainError(ValueError):
    """A training setup problem (bad flag combination, data that does not fit the model...)."""


@dataclass
class TrainConfig:
    out: str = "runs/default"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; or give tokens
    tokens: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "multistep"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 200
    keep_last: int = 3
    sample_every: int = 0
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU; fp8: V3's FP8 GEMMs (nanoseek.fp8)
    compile: bool = False
    max_bad_steps: int = 5
    tokens_per_step: int = field(init=False, default=0)

    def validate(self, model_cfg: ModelConfig, world_size: int = 1) -> TrainConfig:
        """Check every field; `world_size` data-parallel ranks each read batch_size sequences per micro-batch."""
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "eval_batches", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule: unknown {self.schedule!r}; choose from {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision: unknown {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.seq_len > model_cfg.max_position_embeddings:
            raise TrainError(
                f"seq_len: {self.seq_len} is longer than the model's max_position_embeddings "
                f"({model_cfg.max_position_embeddings})"
            )
        if self.lr <= 0:
            raise TrainError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio: must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise TrainError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        self.tokens_per_step = self.batch_size * self.grad_accum * self.seq_len * world_size
        if self.steps is None:
            if self.tokens is None:
                raise TrainError("steps: give --steps or --tokens")
            self.steps = max(1, math.ceil(self.tokens / self.tokens_per_step))
        if self.steps <= 0:
            raise TrainError(f"steps: must be positive, got {self.steps}")
        return self


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TrainError(f"device: unknown device {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device: cuda requested but no GPU is available")
    return dev


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop saves and exits at the end of the step. A second Ctrl-C aborts."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@torch.no_grad()
def evaluate(model: Transformer, batches, autocast) -> float:
    """Mean next-token loss (nats/token) over the given (x, y) batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    """Owns the model, optimizer, loader and run directory for one run."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        train_loader,
        val_batches_fn=None,
        tokenizer_path: str | Path | None = None,
        bytes_per_token: float | None = None,
        log=print,
        progress: bool = True,
        parallel=None,
    ):
        # parallel: a nanoseek.dist.Parallel when run under torchrun (data/expert parallel, DCP checkpoints);
        # None is one process, as before. The trainer only calls its methods at the marked places.
        self.parallel = parallel
        world_size = parallel.world_size if parallel is not None else 1
        self.cfg = cfg.validate(model_cfg, world_size)
        if parallel is not None:
            parallel.check(model_cfg, self.cfg)  # same config on every rank, a valid EP layout
        self.model_cfg = model_cfg
        self.loader = train_loader
        self.val_batches_fn = val_batches_fn  # () -> iterable of (x, y) over the validation split
        self.tokenizer_path = tokenizer_path
        self.bytes_per_token = bytes_per_token
        self.log = tqdm.write if log is print else log  # print() would land inside the progress bar's line
        self.progress = progress
        self.run_dir = Path(cfg.out)
        # Under a process group the device is the rank's own (Parallel picks it with the backend).
        self.device = parallel.device if parallel is not None else resolve_device(cfg.device)
        # fp8: the Linear GEMMs in FP8 (simulated on CPU); everything else bf16 on GPU, fp32 on CPU.
        on_gpu = self.device.type == "cuda"
        use_bf16 = cfg.precision == "bf16" or (cfg.precision in ("auto", "fp8") and on_gpu)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if use_bf16
            else (lambda: nullcontext())
        )
        self.precision = "fp8" if cfg.precision == "fp8" else "bf16" if use_bf16 else "fp32"
        # fp32 on a CPU: the step's GEMMs on oneDNN where it is exact and faster than MKL (hardware.fast_matmul;
        # 1.1-1.3x tokens/s for `small` on an AVX-512 Zen 5, BENCHMARKS.md).
        self.kernels = fast_matmul if self.device.type == "cpu" and self.precision == "fp32" else nullcontext
        torch.manual_seed(cfg.seed)
        self.model = Transformer(model_cfg, seed=cfg.seed).to(self.device)
        if cfg.precision == "fp8":
            convert_to_fp8(self.model)  # same Parameters and state-dict keys: checkpoints are unchanged
        forward = self.model
        if parallel is not None:
            forward = parallel.parallelize(self.model)  # shard experts, FSDP2/DDP; self.model stays the model
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        if parallel is not None:
            self.optimizer = parallel.adapt_optimizer(self.optimizer)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = (
            0.0  # optimizer-step wall time so far (resumable): the x-axis of equal-time comparisons
        )
        self.bad_steps = 0
        self.flops_per_token = count_flops(model_cfg, cfg.seq_len).full
        self.peak, self.peak_source = peak_flops(self.device, self.precision)
        if world_size > 1:  # MFU of the whole job: the step's tokens over every rank's peak
            self.peak_source = f"{world_size} ranks x {self.peak / 1e9:.0f} GFLOP/s; each: {self.peak_source}"
            self.peak *= world_size

    # ---- persistence ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "loader": self.loader.state_dict(),
            "train_config": {k: v for k, v in asdict(self.cfg).items()},
        }

    def save(self) -> Path:
        kw = dict(
            state=self.state(),
            config=self.model_cfg.to_dict(),
            tokenizer_path=self.tokenizer_path,
            keep_last=self.cfg.keep_last,
        )
        if self.parallel is not None:  # collective: each rank writes its shards (train/dist_checkpoint.py)
            from nanoseek.train.dist_checkpoint import save_dcp

            path = save_dcp(self.run_dir, self.step, self.model, self.optimizer, self.parallel, **kw)
        else:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, **kw)
        self.log(f"checkpoint: {path}")
        return path

    def resume(self) -> bool:
        if self.parallel is not None:
            from nanoseek.train.dist_checkpoint import latest_dcp_checkpoint, load_dcp

            ckpt = latest_dcp_checkpoint(self.run_dir, log=self.log)
        else:
            ckpt = latest_valid_checkpoint(self.run_dir, log=self.log)
        if ckpt is None:
            return False
        saved_cfg = json.loads((ckpt / "config.json").read_text())
        if saved_cfg.get("vocab_size") != self.model_cfg.vocab_size:
            raise CheckpointError(
                f"{ckpt}: vocab mismatch: checkpoint has vocab_size {saved_cfg.get('vocab_size')}, "
                f"the tokenizer has {self.model_cfg.vocab_size}"
            )
        if self.parallel is not None:
            meta = load_dcp(ckpt, self.model, self.optimizer, self.parallel)
        else:
            meta = load_checkpoint(ckpt, self.model, self.optimizer)
        self.step = meta["step"]
        self.tokens_seen = meta["tokens_seen"]
        self.train_seconds = meta.get("train_seconds", 0.0)
        self.loader.load_state_dict(meta["loader"])
        self.log(f"resumed from {ckpt} (step {self.step}, {self.tokens_seen:,} tokens)")
        return True

    def _kernels_note(self) -> str:
        return " (GEMMs on oneDNN)" if self.kernels is fast_matmul and fast_matmul_available() else ""

    def _metrics(self, record: dict[str, Any]) -> None:
        if self.parallel is not None and not self.parallel.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- the loop ------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any] | None:
        cfg, model = self.cfg, self.model
        lr = cfg.lr * lr_multiplier(self.step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        parts = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for i in range(cfg.grad_accum):
            x, y = next(self.loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == cfg.grad_accum - 1
            with (
                self.parallel.gradient_sync(self.forward, last) if self.parallel else nullcontext(),
                self.kernels(),
            ):
                with self.autocast():
                    # logits=False: the fused chunked head + cross-entropy (model/head_loss.py); no [B, T, V].
                    out = self.forward(x, targets=y, logits=False)
                (out.loss / cfg.grad_accum).backward()
            for k in parts:
                parts[k] += getattr(out, k).item() / cfg.grad_accum
        if self.parallel is not None:  # global norm and mean losses: every rank takes the same branch below
            grad_norm = self.parallel.clip_grad_norm_(model, cfg.grad_clip)
            parts = dict(zip(parts, self.parallel.mean(list(parts.values()))))
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step
        if not (math.isfinite(parts["loss"]) and math.isfinite(grad_norm)):
            # Never apply a poisoned update; the step's data is consumed so the run stays deterministic.
            self.optimizer.zero_grad(set_to_none=True)
            for m in model.moe_layers():
                m.tokens_per_expert.zero_()
            self.bad_steps += 1
            rec = {"step": self.step, "event": "nonfinite", "loss": parts["loss"], "grad_norm": grad_norm}
            self._metrics(rec)
            self.log(f"step {self.step}: non-finite loss/grad ({parts['loss']}, {grad_norm}); update skipped")
            return None
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.parallel is not None:
            self.parallel.sync_expert_load(model)  # the whole global batch's load: identical bias updates
        loads = [m.tokens_per_expert.tolist() for m in model.moe_layers()]
        vios = model.update_balance_bias()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        tok_s = cfg.tokens_per_step / dt
        rec = {
            "step": self.step,
            "tokens": self.tokens_seen,
            **{k: round(v, 6) for k, v in parts.items()},
            "lr": lr,
            "grad_norm": round(grad_norm, 5),
            "dt": round(dt, 4),
            "tok_s": round(tok_s, 1),
            "mfu": round(tok_s * self.flops_per_token / self.peak, 4),
        }
        if self.parallel is not None and self.parallel.ep > 1:
            rec["a2a_bytes"] = int(self.parallel.sum([self.parallel.pop_a2a_bytes(model)])[0])
        if vios:
            rec["max_vio"] = round(sum(vios) / len(vios), 4)
            rec["max_vio_layers"] = [round(v, 4) for v in vios]
        if loads and (self.step % cfg.eval_every == 0 or self.step == 1 or self.step == cfg.steps):
            rec["expert_load"] = loads
        return rec

    def run_eval(self) -> dict[str, Any]:
        if self.val_batches_fn is None:
            return {}
        with self.kernels():
            loss = evaluate(self.model, self.val_batches_fn(), self.autocast)
        rec = {
            "step": self.step,
            "event": "eval",
            "val_loss": round(loss, 5),
            "train_seconds": round(self.train_seconds, 2),
        }
        if self.bytes_per_token:
            rec["val_bpb"] = round(loss / (math.log(2) * self.bytes_per_token), 5)
        self._metrics(rec)
        return rec

    def fit(self, sample_fn=None, stop_at: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or until `stop_at`, treated like an interruption: checkpoint and return)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.parallel is None or self.parallel.is_main:
            start_run_dir(self.run_dir, self.step, self.log)  # earlier runs never mix into this one's logs
            write_json_atomic(self.run_dir / "config.json", self.model_cfg.to_dict())
            write_json_atomic(self.run_dir / "train_config.json", asdict(cfg))
        self.model.train()
        n_params = self.parallel.num_params(self.model) if self.parallel else self.model.num_params()
        self.log(
            f"training {self.model_cfg.name}: {n_params:,} params, {cfg.steps} steps x "
            f"{cfg.tokens_per_step:,} tokens, {self.precision} on {self.device}{self._kernels_note()}; MFU peak "
            f"{self.peak / 1e9:.0f} GFLOP/s ({self.peak_source})"
        )
        last_eval: dict[str, Any] = {}
        status = "finished"
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
        )
        with _StopFlag() as flag:
            while self.step < cfg.steps:
                rec = self.train_step()
                bar.update(1)
                if rec is None:
                    if self.bad_steps >= cfg.max_bad_steps:
                        status = "diverged"
                        self.log(
                            f"stopping: {self.bad_steps} non-finite steps in a row; last checkpoint kept"
                        )
                        break
                    continue
                self._metrics(rec)
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}", mfu=f"{rec['mfu']:.0%}"
                )
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.run_eval()
                    if last_eval:
                        vals = ", ".join(f"{k} {v}" for k, v in last_eval.items() if k.startswith("val"))
                        self.log(f"step {self.step}: {vals}")
                if sample_fn and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.log(f"sample @ {self.step}: {sample_fn(self.model)!r}")
                if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
                stop = self.parallel.any(flag.stop) if self.parallel else flag.stop  # all ranks stop together
                if stop or (stop_at is not None and self.step >= stop_at):
                    status = "interrupted"
                    break
        bar.close()
        if status != "diverged" and self.bad_steps == 0:  # never checkpoint right after a non-finite step
            self.save()
        if status == "interrupted":
            self.log(f"interrupted at step {self.step}; resume with --resume")
        evals = {k: v for k, v in last_eval.items() if k.startswith("val")}
        return {"status": status, "step": self.step, "tokens": self.tokens_seen, **evals}
