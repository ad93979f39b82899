"""The IsoFLOP sweep and the runner behind every scaling command: `nanoseek scaling sweep`.

DeepSeek LLM §3.2 (arXiv 2401.02954) and Chinchilla approach 2 (arXiv 2203.15556 §3.2): for each compute budget
C, train models of several sizes M (FLOPs per token), each on D = C / M tokens, with batch size and learning rate
from a hyperparameter law of C (DeepSeek LLM eq. 1 by default, or one fitted by `nanoseek scaling hparams`), and
record the final validation bits-per-byte. `fit.py` turns the results into M_opt(C) and D_opt(C).

The runner: every run is a `RunSpec`, keyed by a hash of everything that changes its outcome (config, tokens,
batch, LR, warmup, data, seed), and trained in its own process (`worker.py`), up to `jobs` at a time. Results go
to OUT/results.jsonl, one JSON line per finished, diverged or failed run, appended as they end; a re-run reads it
and skips finished and diverged runs, retries failed ones (a crash may be transient; the log says why it failed),
and resumes interrupted ones from their checkpoint. Failures are listed at the end and never dropped.

What a reader gets wrong: D is rounded to whole steps, so a run's real compute M x D differs from its budget by
up to half a step; fits use the budget to group runs and each run's own M. Runs with fewer than `min_steps`
steps (big models at small budgets) are not planned: their loss would say more about warmup than about size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import ModelConfig
from nanoseek.scaling.family import Family, describe
from nanoseek.scaling.laws import DEEPSEEK_HPARAMS, DEEPSEEK_M_OPT, HparamLaw, PowerLaw

FINAL = ("finished", "diverged")  # outcomes a re-run keeps; "failed" is retried


class SweepError(ValueError):
    """A sweep that cannot be planned or run as asked; the message says which setting to change."""


@dataclass(frozen=True)
class RunSettings:
    """What every run of a sweep shares."""

    data: str = "default"  # a corpus path or "default" (Shakespeare)
    vocab_size: int = 512
    data_id: str = ""  # corpus fingerprint + tokenizer hash: part of the key, so new data means new runs
    seed: int = 1337
    device: str = "auto"
    warmup_frac: float = 0.05  # linear warmup over this fraction of the steps (DeepSeek LLM: 2000 steps)
    min_steps: int = 50


@dataclass(frozen=True)
class RunSpec:
    kind: str  # isoflop | hparams | check: why the run exists (not part of the key)
    budget: float  # C in FLOPs, M x D
    model: dict  # ModelConfig.to_dict()
    m: int  # FLOPs per token (DeepSeek LLM's M)
    params_non_embedding: int
    params_total: int
    seq_len: int
    batch_size: int  # sequences per step
    steps: int
    lr: float
    warmup_steps: int
    data: str
    vocab_size: int
    data_id: str
    seed: int
    device: str = "auto"

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("kind", "device", "data")}
        fields["model"] = {k: v for k, v in self.model.items() if k != "name"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"C={self.budget:.3g} {self.model.get('name', '?')} B={self.batch_size} lr={self.lr:.3g}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens": self.tokens, "key": self.key}


def make_spec(
    kind: str,
    budget: float,
    cfg: ModelConfig,
    family: Family,
    settings: RunSettings,
    lr: float,
    batch_tokens: float,
) -> RunSpec:
    """A run of `cfg` on D = budget / M tokens, at this LR and (about) this many tokens per step."""
    info = describe(cfg, family.seq_len)
    batch = max(1, round(batch_tokens / family.seq_len))
    steps = max(1, round(budget / info["m"] / (batch * family.seq_len)))
    return RunSpec(
        kind=kind,
        budget=float(budget),
        model=cfg.to_dict(),
        m=info["m"],
        params_non_embedding=info["params_non_embedding"],
        params_total=info["params_total"],
        seq_len=family.seq_len,
        batch_size=batch,
        steps=steps,
        lr=float(lr),
        warmup_steps=max(1, round(settings.warmup_frac * steps)),
        data=settings.data,
        vocab_size=settings.vocab_size,
        data_id=settings.data_id,
        seed=settings.seed,
        device=settings.device,
    )


def plan_isoflop(
    family: Family,
    budgets: list[float],
    settings: RunSettings,
    sizes: int = 7,
    span: float = 8.0,
    center: PowerLaw = DEEPSEEK_M_OPT,
    law: HparamLaw = DEEPSEEK_HPARAMS,
) -> tuple[list[RunSpec], list[str]]:
    """Per budget, `sizes` models log-spaced in M over [center(C) / span, center(C) x span].

    Returns (specs, notes): notes say which sizes were left out for having fewer than settings.min_steps steps."""
    if not budgets:
        raise SweepError("budgets: give at least one compute budget")
    if any(not (c > 0 and math.isfinite(c)) for c in budgets):
        raise SweepError(f"budgets: must be positive FLOP counts, got {budgets}")
    if span < 1:
        raise SweepError(f"span: must be >= 1 (a factor either side of the centre), got {span}")
    specs, notes = [], []
    for c in sorted(set(budgets)):
        mid = center(c)
        for cfg in family.sizes(mid / span, mid * span, sizes):
            spec = make_spec("isoflop", c, cfg, family, settings, law.eta(c), law.batch_tokens(c))
            if spec.steps < settings.min_steps:
                notes.append(
                    f"C={c:.3g}: skipped {cfg.name} (M={spec.m:.3g}): {spec.steps} steps < {settings.min_steps}"
                )
                continue
            specs.append(spec)
    return specs, notes


# ---- results file --------------------------------------------------------------------------------------------
def read_results(path: Path) -> dict[str, dict]:
    """key -> the latest record for it (a later line replaces an earlier one)."""
    records: dict[str, dict] = {}
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SweepError(f"{path}:{n}: not a JSON line; fix or delete that line") from None
            records[rec["key"]] = rec
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- progress ------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fraction_done(run_dir: Path, steps: int) -> float:
    """How far a running run is, from the last line of its metrics.jsonl."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            last = f.read().decode(errors="ignore").strip().splitlines()[-1]
        return min(json.loads(last).get("step", 0) / steps, 1.0)
    except (OSError, IndexError, ValueError):
        return 0.0


class Progress:
    """One status line: runs done / running / left / failed, elapsed, ETA from compute done so far."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.t0 = total, stream, time.time()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last = ""

    def line(self, done: int, running: int, failed: int, compute_done: float, compute_total: float) -> str:
        elapsed = time.time() - self.t0
        left = self.total - done - running - failed
        eta = "?"
        if compute_done > 0 and elapsed > 5:
            eta = _duration(elapsed * (compute_total - compute_done) / compute_done)
        return (
            f"sweep: {done}/{self.total} done, {running} running, {left} left, {failed} failed | "
            f"{_duration(elapsed)} elapsed | ETA {eta}"
        )

    def show(self, text: str, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self.last)))
            self.stream.flush()
        elif force or text.split("|")[0] != self.last.split("|")[0]:
            print(text, file=self.stream, flush=True)
        self.last = text

    def say(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * len(self.last) + "\r")
        print(text, file=self.stream, flush=True)
        if self.tty and self.last:
            self.show(self.last)


# ---- the runner ------------------------------------------------------------------------------------------------
WORKER = [sys.executable, "-m", "nanoseek.scaling.worker"]


def run_sweep(
    specs: list[RunSpec],
    out: str | Path,
    jobs: int = 1,
    threads: int | None = None,
    worker: list[str] | None = None,
    stream=sys.stderr,
    poll: float = 0.5,
) -> list[dict]:
    """Run every spec not finished yet (parallel up to `jobs`) and return one record per spec, in order.

    `worker` is the command that trains one run folder (default: `python -m nanoseek.scaling.worker`); tests
    pass a cheap stand-in. `threads` is torch's CPU threads per run (default 1: sweep models are tiny and gain
    little from a second thread, and on a busy machine a multi-threaded op waits for its slowest thread; we
    measured 0.15 s per step with 1 thread against 2.9 s with 2 on a shared 2-core box). Use --jobs for cores."""
    if jobs < 1:
        raise SweepError(f"jobs: must be >= 1, got {jobs}")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = read_results(results_path)
    unique = {s.key: s for s in specs}
    todo = [s for s in unique.values() if results.get(s.key, {}).get("status") not in FINAL]
    threads = threads or 1
    command = worker or WORKER
    progress = Progress(len(unique), stream)
    done_before = len(unique) - len(todo)
    if done_before:
        progress.say(
            f"sweep: {done_before} of {len(unique)} runs already done in {results_path}; skipping them"
        )
    compute_total = sum(s.budget for s in todo)
    compute_done, failed = 0.0, []
    running: dict[str, tuple[RunSpec, subprocess.Popen, float]] = {}
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                spec = queue.pop(0)
                running[spec.key] = (spec, _launch(spec, out, command, threads), time.time())
            time.sleep(poll)
            for key in [k for k, (_, proc, _) in running.items() if proc.poll() is not None]:
                spec, proc, started = running.pop(key)
                record = _collect(spec, proc.returncode, out / "runs" / key, time.time() - started)
                if record is None:  # interrupted by a signal: resumable, not a result
                    raise KeyboardInterrupt
                _append(results_path, record)
                results[key] = record
                compute_done += spec.budget
                if record["status"] == "failed":
                    failed.append(record)
                    progress.say(
                        f"FAILED {spec.name}: {record['error']} (log: {out / 'runs' / key / 'log.txt'})"
                    )
                else:
                    progress.say(
                        f"{record['status']} {spec.name}: val bpb {record.get('val_bpb')} in {record['wall_seconds']:.0f} s"
                    )
            partial = sum(
                s.budget * _fraction_done(out / "runs" / s.key, s.steps) for s, _, _ in running.values()
            )
            done = len(unique) - len(queue) - len(running) - len(failed)
            progress.show(
                progress.line(done, len(running), len(failed), compute_done + partial, compute_total)
            )
    except KeyboardInterrupt:
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.terminate()  # the trainer saves a checkpoint on SIGTERM and exits
        for _, proc, _ in running.values():
            proc.wait()
        progress.say(f"sweep interrupted; re-run the same command to resume ({results_path})")
        raise
    if progress.tty:
        stream.write("\n")
    if failed:
        progress.say(f"sweep: {len(failed)} run(s) failed; re-run the same command to retry them:")
        for r in failed:
            progress.say(f"  {r['key']} C={r['budget']:.3g} {r['model']['name']}: {r['error']}")
    return [results[s.key] for s in specs]


def _launch(spec: RunSpec, out: Path, command: list[str], threads: int) -> subprocess.Popen:
    run_dir = out / "runs" / spec.key
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    log = open(run_dir / "log.txt", "a")  # noqa: SIM115 - the child owns it until it exits
    try:
        argv = [*command, str(run_dir), "--threads", str(threads)]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _collect(spec: RunSpec, returncode: int, run_dir: Path, wall: float) -> dict | None:
    """The record of an ended run; None if it was interrupted (it resumes next time)."""
    base = {**spec.to_dict(), "wall_seconds": round(wall, 2), "ended": time.strftime("%Y-%m-%d %H:%M:%S")}
    result_file = run_dir / "result.json"
    if returncode == 0 and result_file.exists():
        return {**base, **json.loads(result_file.read_text()), "wall_seconds": round(wall, 2)}
    if returncode in (3, -2, -15):  # worker.EXIT_INTERRUPTED, or killed by SIGINT / SIGTERM
        return None
    tail = (
        (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-1:]
        if (run_dir / "log.txt").exists()
        else []
    )
    error = f"exit status {returncode}" + (f": {tail[0].strip()}" if tail else "")
    return {**base, "status": "failed", "error": error}


# ---- the plan on disk ------------------------------------------------------------------------------------------
def save_plan(
    out: str | Path, family: Family, settings: RunSettings, law: HparamLaw, specs: list[RunSpec], **extra
) -> None:
    """OUT/sweep.json: what `nanoseek scaling fit` needs to refit, extrapolate and plan a check run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "family": family.to_dict(),
        "settings": dataclasses.asdict(settings),
        "law": law.to_dict(),
        "budgets": sorted({s.budget for s in specs}),
        "keys": [s.key for s in specs],
        **extra,
    }
    (out / "sweep.json").write_text(json.dumps(plan, indent=1) + "\n")


def load_plan(out: str | Path) -> dict:
    path = Path(out) / "sweep.json"
    if not path.exists():
        raise SweepError(f"{path}: no sweep here; run `nanoseek scaling sweep --out {out}` first")
    plan = json.loads(path.read_text())
    plan["family"] = Family(**plan["family"])
    plan["settings"] = RunSettings(**plan["settings"])
    law = plan["law"]
    plan["law"] = HparamLaw(PowerLaw(**law["eta"]), PowerLaw(**law["batch_tokens"]), law["source"])
    return plan
