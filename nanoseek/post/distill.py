"""Rejection sampling and distillation: `nanoseek distill` (DeepSeek-R1 §2.3.3 and §2.4, REFERENCE §9.4-9.5).

1. Rejection sampling: the teacher (a nanoseek run or a Hugging Face checkpoint) samples K completions for each
   of P training problems; only completions that are well formed *and* verified correct by the task's checker are
   kept (R1 keeps "only the correct ones"), duplicates within a problem dropped. They are written as SFT
   conversations (`OUT/distill.jsonl`) with the counts (`OUT/distill_stats.json`).
2. Sequence-level distillation: SFT of the student on those conversations (sft.py: assistant-only loss,
   packing, the pretraining trainer). R1's distilled models are exactly this: SFT only, no RL (§2.4).
3. Optional logit distillation (`kd_weight` > 0): the loss on assistant tokens becomes
       (1 - kd_weight) * CE(student) + kd_weight * tau^2 * KL(p_teacher^tau || p_student^tau)
   with the forward KL over the full vocabulary at temperature tau (Hinton et al. 2015; forward KL = the student
   covers the teacher's mass, GKD's beta = 0). It needs the same tokenizer, so the vocabularies line up.

The student is either a run/checkpoint to start from (`student_init`) or a fresh model of a given config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.post.chat import IGNORE, prompt_format
from nanoseek.post.evaluate import evaluate, score
from nanoseek.post.rollout import Sampler
from nanoseek.post.sft import build_sft_trainer, write_conversations
from nanoseek.post.tasks import Task
from nanoseek.train.checkpoint import write_json_atomic
from nanoseek.train.trainer import TrainConfig


class DistillError(ValueError):
    """A distillation setup that cannot work (tokenizers differ, nothing correct to keep, ...)."""


@dataclass
class RejectionStats:
    problems: int
    samples: int
    correct: int  # verified-correct samples, duplicates included
    kept: int  # distinct correct samples written
    solved: int  # problems with at least one kept sample

    def summary(self) -> str:
        return (
            f"{self.samples} samples on {self.problems} problems: {self.correct} correct "
            f"({self.correct / max(self.samples, 1):.1%}), kept {self.kept} distinct, {self.solved} problems solved"
        )


def rejection_sample(
    sampler: Sampler,
    task: Task,
    problems: int,
    samples_per_problem: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_problems: int = 32,
) -> tuple[list[list[dict]], RejectionStats]:
    """SFT conversations built from the teacher's verified-correct, well-formed samples on training problems."""
    chosen = task.problems("train", problems, seed)
    conversations: list[list[dict]] = []
    correct = kept = solved = samples = 0
    for start in range(0, len(chosen), batch_problems):
        batch = chosen[start : start + batch_problems]
        prompts = [sampler.fmt.prompt_ids(p.prompt) for p in batch]
        groups = sampler.generate(prompts, samples_per_problem, temperature, seed=seed * 7_919 + start)
        acc, fmt = score(batch, groups)
        for p, group, a, f in zip(batch, groups, acc, fmt):
            seen: set[str] = set()
            for c, ok, well_formed in zip(group, a, f):
                samples += 1
                if not (ok and well_formed):
                    continue
                correct += 1
                if c.text in seen:
                    continue
                seen.add(c.text)
                conversations.append(
                    [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": c.text}]
                )
            kept += len(seen)
            solved += bool(seen)
    return conversations, RejectionStats(len(chosen), samples, correct, kept, solved)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean over rows of tau^2 KL(softmax(t / tau) || softmax(s / tau)); logits [N, V]."""
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * tau**2


class LogitDistillation(nn.Module):
    """Stands in for the student's forward in the Trainer: adds the forward-KL term on assistant tokens."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float, tau: float = 1.0):
        super().__init__()
        self.student, self.weight, self.tau = student, weight, tau
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule, never trained/saved

    def forward(self, x: torch.Tensor, targets: torch.Tensor, logits: bool = True):  # noqa: ARG002
        out = self.student(x, targets=targets)  # the KL needs the logits: never the fused loss path
        trained = targets != IGNORE  # [B, T]
        with torch.no_grad():
            teacher_logits = self.teacher[0](x).logits[trained]
        kd = forward_kl(teacher_logits, out.logits[trained], self.tau)
        out.loss = out.loss - self.weight * out.lm_loss + self.weight * kd
        return out


def distill(
    teacher: str,
    task: Task,
    cfg: TrainConfig,
    *,
    student_init: str | None = None,
    student_config=None,
    problems: int = 1000,
    samples_per_problem: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    epochs: float = 2.0,
    kd_weight: float = 0.0,
    kd_temperature: float = 1.0,
    eval_problems: int = 200,
    pass_k: int = 8,
    seed: int = 0,
    log=print,
    progress: bool = True,
) -> dict:
    """Rejection-sample from the teacher, SFT the student on the kept samples, evaluate it; returns the results."""
    from nanoseek.infer import load
    from nanoseek.tokenizer import Tokenizer

    if (student_init is None) == (student_config is None):
        raise DistillError("give exactly one of student_init (a run to start from) or student_config")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_model, tokenizer = load(teacher)
    teacher_model.float()
    if student_init is not None:
        if not Path(student_init).is_dir():
            raise DistillError(f"student_init: {student_init}: no such run or checkpoint folder")
        student_tok = Tokenizer.load(Path(student_init) / "tokenizer.json")
        if student_tok.sha256 != tokenizer.sha256:
            raise DistillError(
                "the student's tokenizer differs from the teacher's; distill needs the same one"
            )
    sampler = Sampler(teacher_model, prompt_format(tokenizer, "r1"), max_new_tokens, max_batch=256)
    conversations, stats = rejection_sample(sampler, task, problems, samples_per_problem, temperature, seed)
    log(f"rejection sampling: {stats.summary()}")
    if not conversations:
        raise DistillError("the teacher produced no verified-correct sample; nothing to distill")
    write_conversations(out / "distill.jsonl", conversations)
    write_json_atomic(out / "distill_stats.json", {**stats.__dict__, "teacher": str(teacher)})

    tokenizer_source = student_init if student_init is not None else str(Path(teacher))
    trainer = build_sft_trainer(
        tokenizer_source,
        conversations,
        cfg,
        log=log,
        progress=progress,
        model_config=student_config,
        epochs=epochs,
        vocab_size=teacher_model.cfg.vocab_size,  # logit distillation needs the same output space
    )
    if student_init is not None:
        _, student_tok = load(student_init)
        if student_tok.sha256 != tokenizer.sha256:
            raise DistillError(
                "the student's tokenizer differs from the teacher's; distill needs the same one"
            )
    if kd_weight > 0:
        if trainer.model.cfg.vocab_size != teacher_model.cfg.vocab_size:
            raise DistillError(
                f"logit distillation needs equal vocabularies: student {trainer.model.cfg.vocab_size}, "
                f"teacher {teacher_model.cfg.vocab_size}"
            )
        trainer.forward = LogitDistillation(trainer.model, teacher_model, kd_weight, kd_temperature)
    result = trainer.fit()
    sampler = Sampler(trainer.model, prompt_format(tokenizer, "r1"), max_new_tokens, max_batch=256)
    held_out = evaluate(sampler, task.problems("test", eval_problems, 0), k=pass_k) if eval_problems else {}
    summary = {"rejection": stats.__dict__, "train": result, "eval": held_out}
    (out / "distill_result.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
