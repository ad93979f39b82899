"""The speedrun (`make run` = `nanoseek speedrun`): tokenizer -> pretraining -> SFT -> GRPO -> report.

On the 2-core CPU reference machine it pretrains the `tiny` DeepSeek-V3-architecture model (MLA, DeepSeekMoE
with 16 fine-grained routed experts + 1 shared, aux-loss-free balancing, one MTP module) on Shakespeare's complete
works in under 15 minutes, end to end, and writes `RUN_DIR/report.md`. Then a short SFT cold start on generated
arithmetic traces and GRPO (nanoseek/post/stages.py, in RUN_DIR/sft and RUN_DIR/grpo) add a post-training section.
`--quick` is the same pipeline shrunk to well under a minute, for tests.
"""

from __future__ import annotations

import time
from pathlib import Path

from nanoseek.config import ModelConfig, get_preset
from nanoseek.post.stages import post_training
from nanoseek.sample import generate
from nanoseek.train.report import write_report
from nanoseek.train.run import build_trainer, prepare_data
from nanoseek.train.trainer import TrainConfig

PROMPTS = ["ROMEO:\n", "To be, or not to be", "KING HENRY V:\nOnce more"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def speedrun_configs(quick: bool, out: str, steps: int | None = None) -> tuple[ModelConfig, TrainConfig, int]:
    """(model config, train config, tokenizer vocab size). The full run is sized for <= 15 min on 2 cores."""
    if quick:
        model = get_preset("tiny").replace(
            hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_attention_heads=2
        )
        train = TrainConfig(
            out=out,
            seq_len=64,
            batch_size=8,
            steps=steps or 30,
            warmup_steps=5,
            eval_every=15,
            eval_batches=4,
            ckpt_every=1000,
            lr=3e-3,
        )
        return model, train, 512
    model = get_preset("tiny")
    train = TrainConfig(
        out=out,
        seq_len=256,
        batch_size=16,
        steps=steps or 1200,
        warmup_steps=50,
        eval_every=100,
        eval_batches=32,
        ckpt_every=300,
        lr=3e-3,
    )
    return model, train, 4096


class Unfinished(Exception):
    """Pretraining ended early ("interrupted" by Ctrl-C / SIGTERM after saving a checkpoint, or "diverged"), so
    the speedrun stops there: no SFT, RL or report on a half-trained model."""

    def __init__(self, status: str):
        super().__init__(f"pretraining {status}")
        self.status = status


def speedrun(
    out: str = "runs/speedrun",
    data: str = "default",
    quick: bool = False,
    steps: int | None = None,
    resume: bool = False,
    log=print,
    progress: bool = True,
) -> Path:
    t0 = time.perf_counter()
    model_cfg, train_cfg, vocab = speedrun_configs(quick, out, steps)
    prepared = prepare_data(data, None, vocab, log=log, progress=progress)
    trainer = build_trainer(model_cfg, train_cfg, prepared, log=log, progress=progress)
    if resume:
        trainer.resume()
    resumed_at = trainer.step
    result = trainer.fit()
    if result["status"] != "finished":  # Ctrl-C / SIGTERM or a diverged loss: post-train nothing on it
        raise Unfinished(result["status"])
    tok = prepared.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = generate(
            trainer.model, bos + tok.encode(prompt), 24 if quick else 120, temperature=0.8, top_k=50, seed=i
        )
        samples.append(prompt + tok.decode(ids))
    # Post-training resumes only on the pretrained model it started from: if this call pretrained further (a
    # finished run given more --steps), its SFT and GRPO start over from the new weights.
    post_resume = resume and result["step"] == resumed_at
    post = post_training(train_cfg.out, quick, post_resume, log=log, progress=progress)  # SFT, then GRPO
    report = write_report(
        train_cfg.out,
        samples,
        extra={
            "data": prepared.manifest["source"],
            "tokenizer": f"byte-level BPE, {tok.vocab_size} tokens ({prepared.bytes_per_token:.2f} bytes/token)",
            "status": result["status"],
            "wall time (everything, incl. tokenizer and data)": _duration(time.perf_counter() - t0),
        },
    )
    report.write_text(report.read_text() + "\n".join(post) + "\n")
    log(f"report: {report}")
    return report
