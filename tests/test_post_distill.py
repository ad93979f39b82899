"""Rejection sampling and distillation (nanoseek/post/distill.py)."""

import torch

from nanoseek.post.distill import LogitDistillation, forward_kl, rejection_sample
from nanoseek.post.rollout import Completion
from nanoseek.post.tasks import make_task


class ScriptedSampler:
    """Stands in for the teacher: answers each multiplication right, wrong, malformed, or right twice."""

    class fmt:  # noqa: N801
        @staticmethod
        def prompt_ids(question):
            return [len(question)]

    def __init__(self, problems):
        self.answers = {len(p.prompt): p.answer for p in problems}  # prompt ids -> answer (unique here)

    def generate(self, prompts, n, temperature=1.0, seed=0, **kw):
        out = []
        for (key,) in prompts:
            a = self.answers.get(key, "0")
            texts = [
                f"<think>x</think><answer>{a}</answer>",
                f"<think>x</think><answer>{int(a) + 1}</answer>",
                f"<answer>{a}</answer>",
                f"<think>x</think><answer>{a}</answer>",
                "garbage",
            ]
            out.append([Completion([key], [], texts[i % len(texts)], False) for i in range(n)])
        return out


def test_rejection_sampling_keeps_only_verified_correct_well_formed_distinct_samples():
    task = make_task("mul:digits=1,min_digits=1")
    problems = task.problems("train", 1)
    sampler = ScriptedSampler(problems)
    convs, stats = rejection_sample(sampler, task, problems=1, samples_per_problem=5)
    assert stats.samples == 5 and stats.correct == 2 and stats.kept == 1 and stats.solved == 1
    (conv,) = convs
    assert conv[0] == {"role": "user", "content": problems[0].prompt}
    assert conv[1]["content"] == f"<think>x</think><answer>{problems[0].answer}</answer>"


def test_forward_kl_is_zero_for_equal_logits_and_positive_otherwise():
    t = torch.randn(6, 11)
    assert forward_kl(t, t).abs() < 1e-6
    assert forward_kl(t, torch.randn(6, 11)) > 0
    # temperature scaling: tau^2 KL(p^tau || q^tau)
    s = torch.randn(6, 11)
    manual = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(
        -1
    )
    assert torch.allclose(forward_kl(t, s, tau=2.0), 4 * manual.mean())


def test_logit_distillation_mixes_ce_and_kl_on_trained_tokens_only():
    from post_helpers import small_cfg

    from nanoseek.model import Transformer

    student, teacher = Transformer(small_cfg(), seed=0), Transformer(small_cfg(), seed=1)
    x = torch.randint(0, 300, (2, 10))
    y = x.clone()
    y[:, :4] = -100
    wrapped = LogitDistillation(student, teacher, weight=0.5)
    out = wrapped(x, targets=y)
    plain = student(x, targets=y)
    kd = forward_kl(teacher(x).logits[y != -100], plain.logits[y != -100])
    assert torch.allclose(
        out.loss, 0.5 * plain.lm_loss + 0.5 * kd + plain.mtp_loss + plain.balance_loss, atol=1e-5
    )
    assert all(not n.startswith("teacher") for n, _ in wrapped.named_parameters())


def test_distill_writes_the_kept_samples_and_trains_a_fresh_student_with_logit_loss(tmp_path, monkeypatch):
    """The wiring: rejection sampling (scripted here) -> distill.jsonl -> student SFT with KD -> evaluation."""
    from post_helpers import one_thread, save_run, small_cfg

    import nanoseek.post.distill as distill_module
    from nanoseek.post.distill import RejectionStats, distill
    from nanoseek.train.trainer import TrainConfig

    threads = one_thread()
    teacher = save_run(tmp_path / "teacher")
    task = make_task("mul:digits=1")
    problems = task.problems("train", 30)
    convs = [
        [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution()}]
        for p in problems
    ]

    def scripted(sampler, task, problems, samples_per_problem, temperature=1.0, seed=0, **kw):
        return convs, RejectionStats(len(convs), 4 * len(convs), len(convs), len(convs), len(convs))

    monkeypatch.setattr(distill_module, "rejection_sample", scripted)
    cfg = TrainConfig(
        out=str(tmp_path / "student"),
        seq_len=63,
        batch_size=4,
        steps=3,
        lr=1e-3,
        warmup_steps=1,
        eval_every=10**6,
        ckpt_every=10**6,
        device="cpu",
    )
    try:
        result = distill(
            str(teacher),
            task,
            cfg,
            student_config=small_cfg(hidden_size=32, num_attention_heads=1),
            kd_weight=0.5,
            eval_problems=4,
            pass_k=2,
            log=lambda *a: None,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "student"
    assert len((out / "distill.jsonl").read_text().splitlines()) == 30
    assert result["rejection"]["kept"] == 30 and result["train"]["step"] == 3
    assert set(result["eval"]) >= {"greedy_pass1", "pass2", "mean2"}
    assert (out / "checkpoints").is_dir() and (out / "distill_result.json").exists()
