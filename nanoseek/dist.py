"""Data and expert parallel training on torch.distributed's own pieces: torchrun's environment, process
groups, FSDP2 (`fully_shard`) or DDP, and all-reduces that keep DeepSeek-V3's aux-free balancer in lockstep.
DeepSeek-V3 §3.2 (training framework), §2.1.2 (bias update over the whole batch); docs/distributed.md.

Launch: `torchrun --nproc-per-node N -m nanoseek train ... [--ep E] [--dp fsdp|ddp]`. torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; `Parallel.from_env` opens the process group (gloo on CPU, NCCL on
GPU) with a timeout, so a rank that never shows up or dies ends in a `DistError` on the others, not a hang.

Layout of W ranks with expert parallelism E (E divides W and n_routed_experts), rank = i*E + j:
  - embedding, attention, dense FFNs, gate, shared experts, head, MTP: data parallel over all W ranks;
  - routed experts: rank j of EP group i (ranks i*E .. i*E+E-1) holds experts [j*N/E, (j+1)*N/E)
    (nanoseek/expert_parallel.py); the W/E ranks with the same j are replicas of those experts.
Every rank reads its own slice of the global batch (TokenLoader rank/world_size), so a step on W ranks is the
computation of one process with a W times larger batch: the losses agree to fp32 rounding (tests/test_dist.py).

Gradients. Each rank's loss is the mean over its tokens; the global loss is the mean over ranks.
  - replicated parameters: gradients averaged over W ranks (DDP's all-reduce, FSDP2's reduce-scatter);
  - routed experts: autograd through the all-to-all already sums the gradients of every rank in the EP
    group, so they are summed over the replicas and divided by W (not by the number of replicas).
  - the clipping norm is global: squares of FSDP shards summed over all ranks, of experts over the EP group.
Balancing. The bias update `b_i += gamma * sign(mean load - load_i)` [V3 §2.1.2] must see the load of the
whole global batch: the per-expert counts are all-reduced (summed) first, so every rank applies the same
update and the routing biases stay bit-identical without ever being broadcast.

Easy to get wrong: every collective must be entered by every rank in the same order. Decisions that end a
run (non-finite loss, Ctrl-C) are therefore taken on all-reduced values, and config checks compare all ranks
before any of them can raise.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.expert_parallel import ExpertParallelExperts

DP_MODES = ("fsdp", "ddp")


class DistError(ValueError):
    """A distributed-setup problem a user can fix (a ValueError, so the CLI prints it as one line)."""


def validate_layout(world_size: int, ep: int, n_routed_experts: int, n_moe_layers: int, dp: str) -> None:
    """Raise DistError unless W ranks can run expert parallelism E over N routed experts."""
    if dp not in DP_MODES:
        raise DistError(f"--dp: unknown mode {dp!r}; choose from {', '.join(DP_MODES)}")
    if ep < 1:
        raise DistError(f"--ep: must be >= 1, got {ep}")
    if world_size % ep:
        raise DistError(
            f"--ep {ep} does not divide the world size {world_size}: expert-parallel groups must tile the "
            f"ranks (launch a multiple of {ep} processes)"
        )
    if ep > 1 and n_moe_layers == 0:
        raise DistError(f"--ep {ep}: the model has no MoE layer to shard")
    if n_routed_experts % ep:
        raise DistError(
            f"--ep {ep} does not divide the {n_routed_experts} routed experts: every rank must hold the same "
            f"number of experts (use an ep that divides {n_routed_experts})"
        )


def config_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Parallel:
    """Who this process is in the run, and the collectives the trainer needs. `Parallel()` = one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep: int = 1
    dp: str = "fsdp"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_mesh: object = None  # DeviceMesh over all ranks ("dp")
    expert_mesh: object = None  # DeviceMesh (expert_dp, ep): rows = replicas, columns = EP groups

    # ---- set-up ------------------------------------------------------------------------------------------
    @classmethod
    def from_env(
        cls, ep: int = 1, dp: str = "fsdp", timeout_s: float = 600.0, device: str = "auto"
    ) -> Parallel:
        """Join the process group torchrun describes in the environment (or run alone if it describes none)."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda and local_rank >= torch.cuda.device_count():
            raise DistError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): start at most one "
                "process per GPU (torchrun --nproc-per-node), or pass --device cpu to run on gloo"
            )
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        par = cls(rank=rank, world_size=world, local_rank=local_rank, ep=ep, dp=dp, device=dev)
        if "RANK" not in env and world == 1:
            return par  # a plain single process: no process group at all
        if dist.is_initialized():
            return par  # already joined (several runs in one job, as in the tests)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise DistError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} unset: launch with torchrun "
                "(it sets the rendezvous address for every rank)"
            )
        if use_cuda:
            torch.cuda.set_device(dev)
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = None
            if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's agent hosts the store and, with its default static rendezvous, keeps it across
                # --max-restarts: a restarted group would read the dead workers' addresses. One key prefix
                # per attempt makes each restart a fresh rendezvous.
                store = dist.PrefixStore(
                    f"nanoseek/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                    dist.TCPStore(
                        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout
                    ),
                )
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world,
                timeout=timeout,
                device_id=dev if use_cuda else None,
            )
        except (dist.DistError, RuntimeError) as e:
            raise DistError(
                f"rendezvous failed on rank {rank} of {world} at {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
                f"after {timeout_s:g} s: {str(e).splitlines()[0]} (did every rank start? torchrun's "
                "--nnodes/--nproc-per-node must add up to the world size; see --dist-timeout)"
            ) from None
        return par

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def joined(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def ep_group(self):
        return self.expert_mesh.get_group("ep")

    @property
    def replica_group(self):
        return self.expert_mesh.get_group("expert_dp")

    def check(self, model_cfg, train_cfg) -> None:
        """Every rank runs the same config and a valid layout, or every rank raises the same DistError."""
        settings = {
            "model": model_cfg.to_dict(),
            "train": {k: v for k, v in vars(train_cfg).items()},
            "parallel": {"ep": self.ep, "dp": self.dp, "world_size": self.world_size},
        }
        if self.joined and self.world_size > 1:
            everyone: list = [None] * self.world_size
            dist.all_gather_object(everyone, settings)
            for r, other in enumerate(everyone):
                if config_digest(other) != config_digest(everyone[0]):
                    raise DistError(
                        f"rank {r} was started with a different configuration than rank 0 "
                        f"({_first_difference(everyone[0], other)}); launch every rank with the same command"
                    )
        validate_layout(self.world_size, self.ep, model_cfg.n_routed_experts, model_cfg.n_moe_layers, self.dp)
        if self.joined and self.expert_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            kind = self.device.type
            self.world_mesh = init_device_mesh(kind, (self.world_size,), mesh_dim_names=("dp",))
            self.expert_mesh = init_device_mesh(
                kind, (self.world_size // self.ep, self.ep), mesh_dim_names=("expert_dp", "ep")
            )

    def close(self) -> None:
        if self.joined:
            dist.destroy_process_group()

    # ---- the model -----------------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard the routed experts (ep > 1), then wrap for data parallelism. Returns the module to call.

        `model` stays the Transformer (FSDP2 changes it in place; DDP wraps it), so `model.moe_layers()` and
        the checkpoint code keep working on it."""
        if self.ep > 1:
            for moe in model.moe_layers():
                moe.experts = ExpertParallelExperts(moe.experts, self.ep_group)
        if not self.joined:
            return model
        experts = set(self.expert_params(model))
        if self.dp == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if experts:  # experts differ per rank: DDP must neither broadcast nor average them
                names = [n for n, p in model.named_parameters() if p in experts]
                DDP._set_params_and_buffers_to_ignore_for_model(model, names)
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            # forward_sync_buffers=False: the routing biases are kept equal by the load all-reduce, and the
            # per-step load counters must stay each rank's own until then.
            return DDP(model, device_ids=device_ids, forward_sync_buffers=False)
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder block (the MTP block too; MTP's own norms/projection stay in the root,
        # because the trainer calls MTPModule.norm outside the module's forward).
        for block in [*model.layers, *(m.block for m in model.mtp)]:
            fully_shard(block, mesh=self.world_mesh, ignored_params=experts & set(block.parameters()) or None)
        fully_shard(model, mesh=self.world_mesh, ignored_params=experts or None)
        return model

    @staticmethod
    def expert_params(model: nn.Module) -> list[nn.Parameter]:
        return [
            p
            for m in model.moe_layers()
            if isinstance(m.experts, ExpertParallelExperts)
            for p in m.experts.parameters()
        ]

    def num_params(self, model: nn.Module) -> int:
        """Parameters of the whole model (FSDP2's DTensors count globally; expert slices times ep)."""
        experts = set(self.expert_params(model))
        return sum(p.numel() * (self.ep if p in experts else 1) for p in model.parameters())

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The same optimizer with each param group split into DTensor and plain-tensor groups.

        Under FSDP2 + EP the FSDP-sharded parameters are DTensors and the experts plain tensors; the
        foreach kernels refuse lists that mix the two."""
        groups = []
        for group in optimizer.param_groups:
            for want_dtensor in (True, False):
                params = [p for p in group["params"] if isinstance(p, DTensor) == want_dtensor]
                if params:
                    groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        if len(groups) == len(optimizer.param_groups):
            return optimizer
        return type(optimizer)(groups)  # each group carries its own hyperparameters

    @contextmanager
    def gradient_sync(self, forward_module: nn.Module, enabled: bool):
        """Skip the data-parallel gradient reduction for all but the last micro-batch of a step."""
        if not self.joined or enabled:
            yield
            return
        if hasattr(forward_module, "no_sync"):  # DDP
            with forward_module.no_sync():
                yield
            return
        forward_module.set_requires_gradient_sync(False)  # FSDP2
        try:
            yield
        finally:
            forward_module.set_requires_gradient_sync(True)

    # ---- one step's collectives ----------------------------------------------------------------------------
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Finish the step's gradients (expert grads summed over replicas, divided by W), clip by the
        global norm; returns the norm before clipping (same on every rank)."""
        expert_list = self.expert_params(model)  # module order: the same on every rank
        experts = set(expert_list)
        expert_grads = [p.grad for p in expert_list if p.grad is not None]
        if expert_grads and self.joined:
            if self.world_size // self.ep > 1:  # one all-reduce over the replicas of this rank's experts
                flat = torch.cat([g.flatten() for g in expert_grads])
                dist.all_reduce(flat, group=self.replica_group)
                for g, summed in zip(expert_grads, flat.split([g.numel() for g in expert_grads])):
                    g.copy_(summed.view_as(g))
            torch._foreach_div_(expert_grads, float(self.world_size))
        sharded = torch.zeros((), device=self.device)  # squares of FSDP shards: summed over all ranks
        expert_sq = torch.zeros((), device=self.device)  # squares of this rank's experts: over the EP group
        replicated = torch.zeros((), device=self.device)  # identical on every rank
        grads = []
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad
            grads.append(g)
            if isinstance(g, DTensor):
                sharded += g.to_local().float().pow(2).sum()
            elif p in experts:
                expert_sq += g.float().pow(2).sum()
            else:
                replicated += g.float().pow(2).sum()
        if self.joined:
            dist.all_reduce(sharded)
            if experts:
                dist.all_reduce(expert_sq, group=self.ep_group)
        total = (sharded + expert_sq + replicated).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in grads:
            g.mul_(coef.to(g.device) if not isinstance(g, DTensor) else coef.item())
        return total.item()

    def sync_expert_load(self, model: nn.Module) -> None:
        """Sum every MoE layer's per-expert token counts over all ranks (before the bias update)."""
        layers = model.moe_layers()
        if not (self.joined and layers):
            return
        flat = torch.cat([m.tokens_per_expert for m in layers])
        dist.all_reduce(flat)
        for m, load in zip(layers, flat.split([m.tokens_per_expert.numel() for m in layers])):
            m.tokens_per_expert.copy_(load)

    def pop_a2a_bytes(self, model: nn.Module) -> int:
        """All-to-all bytes this rank sent since the last call (expert_parallel.ExpertParallelExperts)."""
        return sum(
            m.experts.pop_bytes_sent()
            for m in model.moe_layers()
            if isinstance(m.experts, ExpertParallelExperts)
        )

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.sum(values)]

    def sum(self, values: list[float]) -> list[float]:
        if not self.joined:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. one rank caught Ctrl-C)."""
        if not self.joined:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.joined:
            dist.barrier()


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{prefix}{k} present on one rank only"
            if config_digest(a[k]) != config_digest(b[k]):
                return _first_difference(a[k], b[k], f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} vs {b!r}"
