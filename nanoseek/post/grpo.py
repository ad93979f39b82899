"""GRPO with verifiable rewards: `nanoseek grpo` (DeepSeekMath §4.1, DeepSeek-R1 §2.2; REFERENCE §9).

One RL step:
    1. draw B training problems; sample G completions for each through the inference engine (rollout.py)
    2. score them with the reward functions (rewards.py); group-normalized advantages (objective.py)
       optional dynamic sampling (DAPO): drop groups whose G rewards are all equal and draw more problems, up to
       `max_sampling_rounds` rounds, until B informative groups are collected
    3. log-probs under pi_old (a no-grad pass, only needed when updates go off-policy: mu > 1 or several
       minibatches) and under the frozen reference (only when beta > 0; beta = 0 keeps no reference model)
    4. mu passes over the batch, each split into `minibatches` optimizer steps, minimizing the GRPO loss
Every `eval_every` steps: greedy pass@1 and sampled pass@k on held-out test problems (evaluate.py).

Modes: "r1" prompts with the chat template after a cold-start SFT (DeepSeek-R1 §2.3); "r1-zero" prompts a base
model with the R1-Zero template of Table 1 (chat.py). A tiny base model almost never writes the tags by itself,
so R1-Zero from it sees all-zero rewards and all-zero advantages: give the policy a nonzero pass@k first
(REFERENCE §11).

The run folder looks like a pretraining run's: metrics.jsonl (one record per step, plus `event: eval` records),
checkpoints/step_* (weights, AdamW state, RL clock; --resume continues from the newest), samples.jsonl (held-out
traces at each evaluation), grpo_config.json, tokenizer.json. Rollout seeds and problem draws derive from (seed,
step), so a resumed run draws the same problems and samples as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.post.chat import MODES, prompt_format
from nanoseek.post.evaluate import evaluate, score
from nanoseek.post.objective import LOSS_TYPES, SCALE_REWARDS, group_advantages, grpo_loss
from nanoseek.post.rewards import RewardSet
from nanoseek.post.rollout import Completion, Sampler
from nanoseek.post.tasks import Problem, make_task
from nanoseek.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint, start_run_dir
from nanoseek.train.checkpoint import write_json_atomic as write_json
from nanoseek.train.optim import make_optimizer
from nanoseek.train.trainer import resolve_device


class GRPOError(ValueError):
    """A GRPO setting out of range or a combination that cannot work."""


@dataclass
class GRPOConfig:
    init: str  # the starting policy: a nanoseek run/checkpoint folder or a Hugging Face folder
    task: str  # task spec (tasks/__init__.py)
    out: str = "runs/grpo"
    mode: str = "r1"  # r1 (chat template, after SFT) | r1-zero (R1-Zero template, from a base model)
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format=0.1"])
    steps: int = 200
    prompts_per_step: int = 8  # B: questions per step
    group_size: int = 8  # G: samples per question
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 = no reference model (TRL default; DeepSeekMath 0.04)
    epsilon: float = 0.2  # eps_low
    epsilon_high: float = 0.28  # DAPO clip-higher; set equal to epsilon for the symmetric PPO clip
    loss_type: str = "dapo"  # grpo | dapo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    mu: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass
    micro_batch: int = 16  # sequences per forward/backward (memory only; the loss is exact)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no loss
    eval_every: int = 25
    eval_problems: int = 100
    pass_k: int = 8
    ckpt_every: int = 50
    keep_last: int = 2
    max_minutes: float | None = None  # stop once rollouts + updates have taken this long
    seed: int = 0
    device: str = "auto"

    def validate(self) -> GRPOConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise GRPOError(message)

        need(self.mode in MODES, f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(self.loss_type in LOSS_TYPES, f"loss_type: must be one of {', '.join(LOSS_TYPES)}")
        need(self.scale_rewards in SCALE_REWARDS, f"scale_rewards: must be one of {', '.join(SCALE_REWARDS)}")
        need(self.group_size >= 2, f"group_size: GRPO needs G >= 2 samples per prompt, got {self.group_size}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "minibatches", "micro_batch"):
            need(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        need(self.minibatches <= self.prompts_per_step * self.group_size, "minibatches: more than sequences")
        need(self.lr > 0 and self.beta >= 0, "lr must be > 0 and beta >= 0")
        need(0 <= self.epsilon < 1 and self.epsilon_high >= 0, "epsilon must be in [0, 1), epsilon_high >= 0")
        need(self.temperature > 0, "temperature: RL samples need temperature > 0")
        need(self.max_sampling_rounds >= 1 and self.eval_every >= 1 and self.ckpt_every >= 1, "bad intervals")
        need(self.pass_k >= 0 and self.eval_problems >= 0, "pass_k and eval_problems must be >= 0")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes: must be > 0")
        return self

    @property
    def off_policy(self) -> bool:
        """Do the updates use samples from an older policy (so pi_old must be stored and the clip can act)?"""
        return self.mu > 1 or self.minibatches > 1


@dataclass
class Rollouts:
    """One step's kept groups: problems [N], completions [N][G], rewards/accuracy/format [N][G]."""

    problems: list[Problem]
    completions: list[list[Completion]]
    rewards: torch.Tensor  # [N, G]
    accuracy: torch.Tensor
    format: torch.Tensor
    stats: dict


# ---- log-probs ----------------------------------------------------------------------------------------------
def sequence_batch(completions: list[Completion], pad_id: int):
    """Right-padded prompt+completion tokens -> (inputs [N, L-1], targets [N, L-1], completion mask [N, L-1]).

    Target j is token j+1; the mask is 1 where that token belongs to the completion."""
    seqs = [c.prompt_ids + c.ids for c in completions]
    L = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    for i, (c, s) in enumerate(zip(completions, seqs)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, len(c.prompt_ids) - 1 : len(s) - 1] = 1.0
    return tokens[:, :-1], tokens[:, 1:], mask


def token_logprobs(model, inputs, targets, start: int, temperature: float, with_entropy: bool = False):
    """log pi(target_t | <t) for positions >= start ([N, L-1-start]), and optionally the per-token entropy.

    Logits are divided by the sampling temperature, so pi is the distribution the rollouts were drawn from."""
    logits = model(inputs).logits[:, start:].float() / temperature  # [N, T, V]
    T, V = logits.shape[1], logits.shape[2]
    # flattened: cross_entropy over a transposed [N, V, T] view is ~1.5x slower on CPU
    logp = -F.cross_entropy(logits.reshape(-1, V), targets[:, start:].reshape(-1), reduction="none").view(
        -1, T
    )
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        logp_all = logits.log_softmax(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, log=print, progress: bool = True):
        from nanoseek.infer import load

        self.cfg = cfg.validate()
        self.log = tqdm.write if log is print else log  # print() would land inside the progress bar's line
        self.progress = progress
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.task = make_task(cfg.task)
        self.rewards = RewardSet.from_specs(cfg.rewards)
        self.model, self.tokenizer = load(cfg.init, device=str(self.device))
        self.model.float()
        self.fmt = prompt_format(self.tokenizer, cfg.mode)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        # beta = 0: no reference model at all (TRL's default); otherwise a frozen copy of the initial policy.
        self.ref = None
        if cfg.beta > 0:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.sampler = Sampler(
            self.model, self.fmt, cfg.max_new_tokens, cfg.prompts_per_step * cfg.group_size
        )
        self.test_problems = (
            self.task.problems("test", cfg.eval_problems, seed=0) if cfg.eval_problems else []
        )
        self.step = 0
        self.rl_seconds = 0.0

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            state={"rl_seconds": self.rl_seconds, "grpo_config": asdict(self.cfg)},
            config=self.model.cfg.to_dict(),
            tokenizer_path=self.run_dir / "tokenizer.json",
            keep_last=self.cfg.keep_last,
        )

    def resume(self) -> bool:
        ckpt = latest_valid_checkpoint(self.run_dir, log=self.log)
        if ckpt is None:
            return False
        meta = load_checkpoint(ckpt, self.model, self.optimizer)
        self.step, self.rl_seconds = meta["step"], meta.get("rl_seconds", 0.0)
        self.log(f"resumed from {ckpt} (step {self.step})")
        return True

    def _record(self, rec: dict, name: str = "metrics.jsonl") -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- 1-2: rollouts and rewards ------------------------------------------------------------------------
    def collect(self) -> Rollouts:
        cfg = self.cfg
        B, G = cfg.prompts_per_step, cfg.group_size
        kept: list[tuple] = []
        stats = {"groups_sampled": 0, "zero_std_groups": 0, "rounds": 0, "failures": {}, "errors": {}}
        reward_sums = {name: 0.0 for name in self.rewards.names}
        acc_sum = fmt_sum = 0.0
        lengths, truncated = [], 0
        for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            stream = self.task.stream("train", seed=(cfg.seed * 100_003 + self.step) * 10 + rnd)
            problems = [next(stream) for _ in range(B)]
            prompts = [self.fmt.prompt_ids(p.prompt) for p in problems]
            groups = self.sampler.generate(
                prompts,
                G,
                cfg.temperature,
                cfg.top_k,
                cfg.top_p,
                seed=cfg.seed * 1_000_003 + self.step * 16 + rnd,
            )
            flat = [c for g in groups for c in g]
            fields = [p.reward_fields() for p in problems for _ in range(G)]
            result = self.rewards(
                [p.prompt for p in problems for _ in range(G)], [c.text for c in flat], fields
            )
            acc, fmt = score(problems, groups)
            rewards = torch.tensor(result.total).view(B, G)
            for name, values in result.per_function.items():
                reward_sums[name] += sum(values)
            for name, n in result.failures.items():
                stats["failures"][name] = stats["failures"].get(name, 0) + n
                # broken, not unlucky: RL on all-zero rewards learns nothing
                if n == len(flat) and self.step == 0:
                    raise GRPOError(
                        f"reward {name}: failed on every sample of the first step: {result.errors.get(name)}"
                    )
            stats["errors"].update(result.errors)
            acc_sum += sum(map(sum, acc))
            fmt_sum += sum(map(sum, fmt))
            lengths += [len(c.ids) for c in flat]
            truncated += sum(c.truncated for c in flat)
            stats["rounds"] += 1
            stats["groups_sampled"] += B
            for i in range(B):
                informative = bool(rewards[i].max() > rewards[i].min())
                stats["zero_std_groups"] += not informative
                if informative or not cfg.dynamic_sampling:
                    kept.append((problems[i], groups[i], rewards[i], acc[i], fmt[i]))
            if not cfg.dynamic_sampling or len(kept) >= B:
                break
        kept = kept[:B]
        n = stats["groups_sampled"] * G
        stats.update(
            reward_means={k: v / n for k, v in reward_sums.items()},
            accuracy=acc_sum / n,
            format=fmt_sum / n,
            length=sum(lengths) / n,
            length_max=max(lengths),
            truncated=truncated / n,
            tokens=sum(lengths),
        )
        if not kept:
            return Rollouts([], [], torch.zeros(0, G), torch.zeros(0, G), torch.zeros(0, G), stats)
        return Rollouts(
            [k[0] for k in kept],
            [k[1] for k in kept],
            torch.stack([k[2] for k in kept]),
            torch.tensor([k[3] for k in kept]),
            torch.tensor([k[4] for k in kept]),
            stats,
        )

    # ---- 3-4: the policy update -------------------------------------------------------------------------------
    def update(self, batch: Rollouts, advantages: torch.Tensor) -> dict:
        # Not inside hardware.fast_matmul(), unlike the Trainer: the micro-batches here are padded to their own
        # longest completion, so GEMM shapes change from step to step, and oneDNN pays for every new shape
        # (~250 us a GEMM). bench_grpo's policy update took 0.36 s with it against 0.16 s without.
        cfg, model, dev = self.cfg, self.model, self.device
        flat = [c for g in batch.completions for c in g]
        adv = advantages.flatten()
        inputs, targets, mask = sequence_batch(flat, self.pad_id)
        if cfg.mask_truncated:
            mask = mask * torch.tensor([0.0 if c.truncated else 1.0 for c in flat]).unsqueeze(1)
        start = min(len(c.prompt_ids) for c in flat) - 1  # positions before this never hold completion tokens
        inputs, targets, mask = inputs.to(dev), targets.to(dev), mask[:, start:].to(dev)
        adv = adv.to(dev)
        lengths = torch.tensor([len(c.prompt_ids) + len(c.ids) for c in flat])
        N, width = len(flat), mask.shape[1]

        def pieces(index: torch.Tensor) -> list[torch.Tensor]:
            """Micro-batches of similar length, so each is padded only to its own longest sequence."""
            index = index[lengths[index].argsort(stable=True)]
            return [index[i : i + cfg.micro_batch] for i in range(0, len(index), cfg.micro_batch)]

        def logprobs(m, idx: torch.Tensor, with_entropy: bool = False):
            """[len(idx), width] log-probs (and entropies) of the completion tokens, zero past each piece's end."""
            end = int(lengths[idx].max()) - 1
            logp, entropy = token_logprobs(
                m, inputs[idx, :end], targets[idx, :end], start, cfg.temperature, with_entropy
            )
            pad = (0, width - logp.shape[1])
            return F.pad(logp, pad), None if entropy is None else F.pad(entropy, pad)

        old_logp = ref_logp = None
        with torch.no_grad():
            if cfg.off_policy:  # pi_old: the policy that sampled, before any update of this step
                model.eval()
                old_logp = torch.zeros(N, width, device=dev)
                for idx in pieces(torch.arange(N)):
                    old_logp[idx] = logprobs(model, idx)[0]
            if self.ref is not None:
                ref_logp = torch.zeros(N, width, device=dev)
                for idx in pieces(torch.arange(N)):
                    ref_logp[idx] = logprobs(self.ref, idx)[0]
        model.train()

        sums = {"kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "entropy": 0.0, "tokens": 0.0, "loss": 0.0}
        grad_norms = []
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        for _ in range(cfg.mu):
            order = torch.randperm(N, generator=gen) if cfg.minibatches > 1 else torch.arange(N)
            for mb in order.chunk(cfg.minibatches):
                n_tokens = float(mask[mb].sum())
                for idx in pieces(mb):
                    m = mask[idx]
                    logp, entropy = logprobs(model, idx, with_entropy=True)
                    old = old_logp[idx] if old_logp is not None else logp.detach()
                    terms = grpo_loss(
                        logp,
                        old,
                        adv[idx],
                        m,
                        ref_logp=None if ref_logp is None else ref_logp[idx],
                        beta=cfg.beta,
                        eps_low=cfg.epsilon,
                        eps_high=cfg.epsilon_high,
                        loss_type=cfg.loss_type,
                        max_completion_length=cfg.max_new_tokens,
                        num_sequences=len(mb),
                        num_tokens=n_tokens,
                    )
                    terms.loss.backward()
                    sums["loss"] += terms.loss.item()
                    sums["tokens"] += float(m.sum())
                    sums["entropy"] += float((entropy * m).sum())
                    sums["clip_low"] += float((terms.clipped_low * m).sum())
                    sums["clip_high"] += float((terms.clipped_high * m).sum())
                    if terms.kl is not None:
                        sums["kl"] += float((terms.kl * m).sum())
                grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
                if math.isfinite(grad_norms[-1]):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                model.update_balance_bias()
        tokens = max(sums["tokens"], 1.0)
        out = {
            "loss": sums["loss"] / (cfg.mu * cfg.minibatches),
            "entropy": sums["entropy"] / tokens,
            "clip_low": sums["clip_low"] / tokens,
            "clip_high": sums["clip_high"] / tokens,
            "grad_norm": sum(grad_norms) / len(grad_norms),
        }
        if self.ref is not None:
            out["kl"] = sums["kl"] / tokens
        return out

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        if not self.test_problems:
            return {}
        t0 = time.perf_counter()
        res = evaluate(self.sampler, self.test_problems, k=self.cfg.pass_k, temperature=self.cfg.temperature)
        examples = res.pop("examples")
        rec = {"step": self.step, "event": "eval", **{k: round(v, 4) for k, v in res.items()}}
        rec["eval_s"] = round(time.perf_counter() - t0, 2)
        self._record(rec)
        self._record({"step": self.step, "examples": examples}, "samples.jsonl")
        return rec

    # ---- the loop -------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.collect()
        t_gen = time.perf_counter() - t0
        st = batch.stats
        rec = {
            "step": self.step + 1,
            "reward": round(batch.rewards.mean().item(), 4) if len(batch.problems) else 0.0,
            "reward_std": round(batch.rewards.std(dim=1).mean().item(), 4) if len(batch.problems) else 0.0,
            **{f"rewards/{k}": round(v, 4) for k, v in st["reward_means"].items()},
            "accuracy": round(st["accuracy"], 4),
            "format": round(st["format"], 4),
            "frac_zero_std": round(st["zero_std_groups"] / st["groups_sampled"], 4),
            "groups": len(batch.problems),
            "rounds": st["rounds"],
            "length": round(st["length"], 2),
            "length_max": st["length_max"],
            "truncated": round(st["truncated"], 4),
        }
        for name, n in st["failures"].items():
            if n:
                rec[f"failures/{name}"] = n
                self.log(
                    f"step {self.step + 1}: reward {name} failed on {n} samples: {st['errors'].get(name)}"
                )
        if batch.problems:
            advantages = group_advantages(batch.rewards, cfg.scale_rewards)
            rec.update({k: round(v, 5) for k, v in self.update(batch, advantages).items()})
        t_train = time.perf_counter() - t0 - t_gen
        self.step += 1
        dt = time.perf_counter() - t0
        self.rl_seconds += dt
        rec.update(
            lr=lr,
            gen_s=round(t_gen, 3),
            train_s=round(t_train, 3),
            dt=round(dt, 3),
            gen_tok_s=round(st["tokens"] / max(t_gen, 1e-9), 1),
            rl_seconds=round(self.rl_seconds, 2),
        )
        self._record(rec)
        return rec

    def fit(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start_run_dir(self.run_dir, self.step, self.log)  # an earlier run's records never mix into this one's
        write_json(self.run_dir / "grpo_config.json", asdict(cfg))
        write_json(self.run_dir / "config.json", self.model.cfg.to_dict())
        self.tokenizer.save(self.run_dir / "tokenizer.json")
        self.log(
            f"GRPO on {cfg.task} ({cfg.mode}): {cfg.steps} steps x {cfg.prompts_per_step} prompts x G="
            f"{cfg.group_size}, loss {cfg.loss_type}, scale {cfg.scale_rewards}, beta {cfg.beta}, mu {cfg.mu}, "
            f"eps [{cfg.epsilon}, {cfg.epsilon_high}], lr {cfg.lr}"
        )
        first = last = None
        if self.step == 0:
            first = last = self.evaluate()
            self._log_eval(first)
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
        )
        status = "finished"
        while self.step < cfg.steps:
            rec = self.train_step()
            bar.update(1)
            bar.set_postfix(
                reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}", len=f"{rec['length']:.0f}"
            )
            over_time = cfg.max_minutes is not None and self.rl_seconds >= 60 * cfg.max_minutes
            if over_time:
                status = "time budget reached"
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps or over_time:
                last = self.evaluate()
                self._log_eval(last)
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps and not over_time:
                self.save()
            if over_time:
                break
        bar.close()
        self.save()
        return {
            "status": status,
            "step": self.step,
            "rl_seconds": round(self.rl_seconds, 1),
            "first_eval": first,
            "last_eval": last,
        }

    def _log_eval(self, rec: dict) -> None:
        if rec:
            k = self.cfg.pass_k
            extra = f", pass@{k} {rec[f'pass{k}']:.3f}, mean@{k} {rec[f'mean{k}']:.3f}" if k else ""
            self.log(f"step {self.step}: held-out greedy pass@1 {rec['greedy_pass1']:.3f}{extra}")
