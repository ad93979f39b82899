"""`nanoseek tasks | sft | grpo | distill`: the command-line face of nanoseek/post (see docs/post_training.md).

Handlers parse flags, build the configs and call one entry point; torch-heavy modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import json

from nanoseek.argtypes import fraction, non_negative_int, non_negative_number, positive_int, positive_number

_TASK_HELP = (
    "task spec: add | sub | mul | countdown | linear with knobs (mul:digits=3,digits_b=2; countdown:numbers=4), "
    "a problems file PATH.jsonl of {prompt, answer}, or a mixture a+b"
)
_INIT_HELP = (
    "a nanoseek run or checkpoint folder, or a Hugging Face DeepSeek-V3/V2 folder (with tokenizer.json)"
)


def add_parsers(sub) -> None:
    _add_tasks(sub)
    _add_sft(sub)
    _add_grpo(sub)
    _add_distill(sub)


# ---- tasks --------------------------------------------------------------------------------------------------
def _add_tasks(sub) -> None:
    p = sub.add_parser(
        "tasks",
        help="show generated problems with worked solutions, or write them as SFT / problem JSONL",
        description="Print problems of a task with their worked solutions (the SFT traces), or write N of them as "
        "SFT conversations (--sft-out) or as {prompt, answer} problems (--problems-out).",
    )
    p.add_argument("--task", required=True, help=_TASK_HELP)
    p.add_argument("-n", type=positive_int, default=5, help="problems (5)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="split (train)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--sft-out", metavar="PATH", help="write SFT conversations JSONL here")
    p.add_argument("--problems-out", metavar="PATH", help="write {prompt, answer, ...} JSONL here")
    p.set_defaults(func=cmd_tasks)


def cmd_tasks(args: argparse.Namespace) -> int:
    from nanoseek.post.sft import write_conversations
    from nanoseek.post.tasks import make_task

    task = make_task(args.task)
    problems = task.problems(args.split, args.n, args.seed)
    if args.sft_out:
        convs = [
            [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution()}]
            for p in problems
        ]
        write_conversations(args.sft_out, convs)
        print(f"{args.sft_out}: {len(convs)} conversations ({args.split} split)")
    if args.problems_out:
        with open(args.problems_out, "w") as f:
            for p in problems:
                f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, **p.fields}) + "\n")
        print(f"{args.problems_out}: {len(problems)} problems ({args.split} split)")
    if not (args.sft_out or args.problems_out):
        for p in problems:
            print(f"{p.prompt}\n{p.solution()}\n")
    return 0


# ---- sft ----------------------------------------------------------------------------------------------------
def _add_train_flags(p, lr: float, out: str) -> None:
    t = p.add_argument_group("training")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps (default: --epochs)")
    length.add_argument("--epochs", type=positive_number, default=1.0, help="passes over the data (1)")
    t.add_argument(
        "--seq-len",
        type=positive_int,
        default=256,
        help="longest example kept (256); with sft's --pack, the row length",
    )
    t.add_argument("--batch-size", type=positive_int, default=16, help="rows per micro-batch (16)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (1)")
    t.add_argument("--lr", type=positive_number, default=lr, help=f"peak learning rate ({lr})")
    t.add_argument("--warmup-steps", type=non_negative_int, default=20, help="linear warmup steps (20)")
    t.add_argument("--schedule", choices=("cosine", "multistep", "wsd"), default="cosine", help="(cosine)")
    t.add_argument("--weight-decay", type=non_negative_number, default=0.0, help="AdamW decay (0)")
    t.add_argument("--ckpt-every", type=positive_int, default=500, help="checkpoint every N steps (500)")
    t.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept (2)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order and sampling (0)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--out", default=out, metavar="DIR", help=f"run folder ({out})")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args):
    from nanoseek.train.trainer import TrainConfig

    return TrainConfig(
        out=args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        eval_every=10**9,  # SFT quality is measured on the task, after training
        ckpt_every=args.ckpt_every,
        keep_last=args.keep_last,
        seed=args.seed,
        device=args.device,
    )


def _add_sft(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat data (loss on assistant tokens only)",
        description="Fine-tune a model on JSONL conversations ({messages: [...]} or {prompt, completion}) or on "
        "worked solutions generated by a task. Loss on assistant tokens only; one example per row, or whole examples "
        "packed into rows with --pack. "
        "Checkpoints, --resume, metrics.jsonl and report.md as in pretraining. See nanoseek/post/sft.py.",
    )
    p.add_argument("--init", required=True, metavar="DIR", help=f"model to fine-tune: {_INIT_HELP}")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="PATH", help="JSONL conversations")
    data.add_argument("--task", help=f"generate worked solutions instead: {_TASK_HELP}")
    p.add_argument("--examples", type=positive_int, default=20000, help="conversations for --task (20000)")
    p.add_argument(
        "--eval-problems",
        type=non_negative_int,
        default=200,
        help="held-out problems for --task (200; 0 = none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--pack", action="store_true", help="pack whole examples into rows (no cross-example mask)"
    )
    _add_train_flags(p, lr=1e-3, out="runs/sft")
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.post.sft import build_sft_trainer, load_conversations, task_conversations
    from nanoseek.post.tasks import make_task
    from nanoseek.train.report import write_report

    task = make_task(args.task) if args.task else None
    convs = task_conversations(task, args.examples, args.seed) if task else load_conversations(args.data)
    trainer = build_sft_trainer(
        args.init,
        convs,
        _train_config(args),
        args.resume,
        progress=not args.no_progress,
        epochs=args.epochs,
        pack=args.pack,
    )
    result = trainer.fit()
    write_report(args.out)
    if task and args.eval_problems > 0:
        result["held_out"] = _held_out(trainer.model, args.out, task, args.eval_problems)
    print(json.dumps(result))
    return 0 if result["status"] != "diverged" else 1


def _held_out(model, run_dir: str, task, n: int) -> dict:
    from nanoseek.post.chat import prompt_format
    from nanoseek.post.evaluate import evaluate
    from nanoseek.post.rollout import Sampler
    from nanoseek.tokenizer import Tokenizer

    fmt = prompt_format(Tokenizer.load(f"{run_dir}/tokenizer.json"), "r1")
    res = evaluate(Sampler(model, fmt, 128, max_batch=128), task.problems("test", n, 0), k=0)
    res.pop("examples")
    return res


# ---- grpo ---------------------------------------------------------------------------------------------------
def _add_grpo(sub) -> None:
    p = sub.add_parser(
        "grpo",
        help="GRPO with verifiable rewards (DeepSeekMath / R1; DAPO and Dr. GRPO options)",
        description="Reinforcement learning with GRPO: G samples per prompt from the inference engine, rule "
        "rewards, group-normalized advantages, clipped ratio, optional k3 KL to a frozen reference. Logs rewards, "
        "accuracy, lengths, KL, clip fraction and entropy; held-out greedy pass@1 and pass@k every --eval-every "
        "steps; checkpoints and --resume. See nanoseek/post/grpo.py and objective.py.",
    )
    p.add_argument("--init", required=True, metavar="DIR", help=f"starting policy: {_INIT_HELP}")
    p.add_argument("--task", required=True, help=_TASK_HELP)
    p.add_argument(
        "--mode",
        choices=("r1", "r1-zero"),
        default="r1",
        help="chat template after SFT (r1) or the R1-Zero template on a base model (r1-zero) (r1)",
    )
    p.add_argument(
        "--reward",
        action="append",
        metavar="NAME[=W]",
        help="reward function and weight, repeatable: accuracy, format, or module:function "
        "(signature (prompts, completions, **task_fields) -> list[float]) (default: accuracy format=0.1)",
    )
    p.add_argument("--out", default="runs/grpo", metavar="DIR", help="run folder (runs/grpo)")
    p.add_argument("--steps", type=positive_int, default=200, help="RL steps (200)")
    p.add_argument("--max-minutes", type=positive_number, help="stop once RL has run this long")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts-per-step", type=positive_int, default=8, help="B questions per step (8)")
    g.add_argument("--group-size", type=positive_int, default=8, help="G samples per question (8)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="completion length cap (64)")
    g.add_argument("--temperature", type=positive_number, default=1.0, help="sampling temperature (1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    g.add_argument("--top-p", type=fraction, default=1.0, help="top-p (1.0 = off)")
    g.add_argument("--dynamic-sampling", action="store_true", help="DAPO: drop zero-std groups, draw more")
    g.add_argument("--max-sampling-rounds", type=positive_int, default=3, help="dynamic sampling rounds (3)")
    g.add_argument(
        "--mask-truncated", action="store_true", help="DAPO overlong filtering: no loss on truncated"
    )
    o = p.add_argument_group("objective")
    o.add_argument(
        "--loss-type", choices=("grpo", "dapo", "dr_grpo"), default="dapo", help="aggregation (dapo)"
    )
    o.add_argument("--scale-rewards", choices=("group", "batch", "none"), default="group", help="(group)")
    o.add_argument(
        "--beta", type=non_negative_number, default=0.0, help="k3 KL coefficient; 0 = no reference (0)"
    )
    o.add_argument("--epsilon", type=non_negative_number, default=0.2, help="clip eps_low (0.2)")
    o.add_argument(
        "--epsilon-high", type=non_negative_number, default=0.28, help="clip eps_high (0.28, DAPO)"
    )
    o.add_argument("--mu", type=positive_int, default=1, help="passes over each rollout batch (1)")
    o.add_argument("--minibatches", type=positive_int, default=1, help="optimizer steps per pass (1)")
    o.add_argument("--micro-batch", type=positive_int, default=16, help="sequences per forward (16)")
    o.add_argument("--lr", type=positive_number, default=1e-5, help="learning rate (1e-5)")
    o.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warmup (0)")
    o.add_argument("--weight-decay", type=non_negative_number, default=0.0, help="AdamW decay (0)")
    o.add_argument("--grad-clip", type=positive_number, default=1.0, help="gradient-norm clip (1.0)")
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument("--eval-every", type=positive_int, default=25, help="held-out eval every N steps (25)")
    e.add_argument(
        "--eval-problems", type=non_negative_int, default=100, help="held-out problems (100; 0 = none)"
    )
    e.add_argument(
        "--pass-k", type=non_negative_int, default=8, help="k of sampled pass@k (8; 0 = greedy only)"
    )
    e.add_argument("--ckpt-every", type=positive_int, default=50, help="checkpoint every N steps (50)")
    e.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept (2)")
    e.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of problems and samples (0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grpo)


def cmd_grpo(args: argparse.Namespace) -> int:
    from nanoseek.post.grpo import GRPOConfig, GRPOTrainer
    from nanoseek.post.report import write_grpo_report

    cfg = GRPOConfig(
        init=args.init,
        task=args.task,
        out=args.out,
        mode=args.mode,
        rewards=args.reward or ["accuracy", "format=0.1"],
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        beta=args.beta,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon_high,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        mu=args.mu,
        minibatches=args.minibatches,
        micro_batch=args.micro_batch,
        dynamic_sampling=args.dynamic_sampling,
        max_sampling_rounds=args.max_sampling_rounds,
        mask_truncated=args.mask_truncated,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        pass_k=args.pass_k,
        ckpt_every=args.ckpt_every,
        keep_last=args.keep_last,
        max_minutes=args.max_minutes,
        seed=args.seed,
        device=args.device,
    )
    trainer = GRPOTrainer(cfg, progress=not args.no_progress)
    if args.resume and not trainer.resume():
        print(f"nanoseek: no checkpoint in {args.out} yet; starting from --init")
    result = trainer.fit()
    print(f"report: {write_grpo_report(args.out)}")
    print(json.dumps(result))
    return 0


# ---- distill ------------------------------------------------------------------------------------------------
def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="rejection-sample verified-correct traces from a teacher, then SFT a student on them",
        description="Sample K completions per training problem from a teacher, keep only the verified-correct "
        "and well-formed ones (OUT/distill.jsonl), fine-tune a student on them (sequence-level distillation), "
        "optionally adding a forward-KL loss to the teacher's logits. Evaluates the student on held-out problems. "
        "See nanoseek/post/distill.py.",
    )
    p.add_argument("--teacher", required=True, metavar="DIR", help=f"the teacher: {_INIT_HELP}")
    p.add_argument("--task", required=True, help=_TASK_HELP)
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-init", metavar="DIR", help="a student run/checkpoint to start from")
    student.add_argument(
        "--student-config", metavar="PRESET|PATH", help="train a fresh student of this preset or config JSON"
    )
    p.add_argument("--problems", type=positive_int, default=1000, help="training problems sampled (1000)")
    p.add_argument("--samples-per-problem", type=positive_int, default=4, help="K samples each (4)")
    p.add_argument(
        "--sample-temperature", type=positive_number, default=1.0, help="teacher temperature (1.0)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="completion length cap (64)")
    p.add_argument("--kd-weight", type=fraction, help="weight of the forward-KL logit loss (off by default)")
    p.add_argument("--kd-temperature", type=positive_number, default=1.0, help="KL temperature tau (1.0)")
    p.add_argument(
        "--eval-problems", type=non_negative_int, default=200, help="held-out problems (200; 0 = none)"
    )
    p.add_argument("--pass-k", type=non_negative_int, default=8, help="k of sampled pass@k (8)")
    _add_train_flags(p, lr=1e-3, out="runs/distill")
    p.set_defaults(func=cmd_distill, epochs=2.0)


def cmd_distill(args: argparse.Namespace) -> int:
    from nanoseek.config import resolve_config
    from nanoseek.post.distill import distill
    from nanoseek.post.tasks import make_task

    result = distill(
        args.teacher,
        make_task(args.task),
        _train_config(args),
        student_init=args.student_init,
        student_config=resolve_config(args.student_config) if args.student_config else None,
        problems=args.problems,
        samples_per_problem=args.samples_per_problem,
        temperature=args.sample_temperature,
        max_new_tokens=args.max_new_tokens,
        epochs=args.epochs,
        kd_weight=args.kd_weight or 0.0,
        kd_temperature=args.kd_temperature,
        eval_problems=args.eval_problems,
        pass_k=args.pass_k,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result["eval"].pop("examples", None)
    print(json.dumps(result))
    return 0
