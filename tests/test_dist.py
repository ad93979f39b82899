"""nanoseek/dist.py, expert_parallel.py, train/dist_checkpoint.py: 2 gloo processes on loopback (CPU).

Spawning a pair of processes costs seconds (each imports torch), so one pair (`_worker`) runs every
distributed check in turn and writes what it saw to JSON; the tests read it. The reference is one process
with the same global batch: 4 sequences per step, which 2 ranks split 2 + 2 (or 1 + 1 over 2 micro-batches).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nanoseek.config import get_preset
from nanoseek.data import TokenLoader
from nanoseek.dist import DistError, Parallel, validate_layout
from nanoseek.expert_parallel import a2a_bytes_per_token
from nanoseek.train.checkpoint import load_model
from nanoseek.train.dist_checkpoint import export_single
from nanoseek.train.trainer import TrainConfig, Trainer

CFG = get_preset("tiny").replace(vocab_size=256, max_position_embeddings=128)
STEPS, SEQ, GLOBAL_BATCH = 4, 32, 4
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(tmp: Path, out: str, parallel=None, batch=GLOBAL_BATCH, accum=1, **kw) -> Trainer:
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    loader = TokenLoader(tmp / "tokens.bin", batch, SEQ, seed=0, dtype="uint16", rank=rank, world_size=world)
    kw.setdefault("device", "cpu")  # gloo runs: the reference must not move to a GPU when one is present
    tc = TrainConfig(
        out=str(tmp / out),
        seq_len=SEQ,
        batch_size=batch,
        grad_accum=accum,
        steps=STEPS,
        warmup_steps=1,
        eval_every=100,
        ckpt_every=2,
        lr=3e-3,
        **kw,
    )
    return Trainer(CFG, tc, loader, None, log=lambda *a: None, progress=False, parallel=parallel)


def _train(trainer: Trainer) -> dict[int, float]:
    """Steps up to STEPS (no checkpoints, no metrics file) -> {step: loss}; the loss is the global mean."""
    losses = {}
    while trainer.step < STEPS:
        rec = trainer.train_step()
        losses[rec["step"]] = rec["loss"]
    return losses


def _losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and r.get("event") is None}


def _biases(model) -> list[list[float]]:
    return [m.gate.e_score_bias.tolist() for m in model.moe_layers()]


# ---- the worker: every distributed check, on each of the 2 ranks ----------------------------------------
def _round_trips(rank: int) -> dict:
    """dispatch -> identity experts -> combine must give back exactly the rows sent, for random routings
    (some experts empty, one case where rank 1 routes nothing at all); gradients come back the same way."""
    from nanoseek.expert_parallel import combine, dispatch

    ok, grads_ok, local_ok = [], [], []
    E, ep = 16, 2
    for case in range(6):
        g = torch.Generator().manual_seed(100 * case + rank)
        T = 0 if (case == 5 and rank == 1) else int(torch.randint(1, 40, (1,), generator=g))
        allowed = torch.randperm(E, generator=g)[: int(torch.randint(1, E + 1, (1,), generator=g))]
        idx = allowed[torch.randint(0, len(allowed), (T, 4), generator=g)].flatten()  # [T*K] expert ids
        order = idx.argsort(stable=True)
        x = torch.randn(T * 4, 8, generator=g)[order].requires_grad_(True)  # rows sorted by expert
        counts = torch.bincount(idx, minlength=E)
        local, plan = dispatch(x, counts, None)
        # every received row belongs to one of my experts, grouped by expert
        expected = int(sum(plan.recv_splits)) == int(plan.local_counts.sum()) == local.shape[0]
        local_ok.append(expected and len(plan.local_counts) == E // ep)
        back = combine(local * 1.0, plan, None)
        ok.append(back.shape == x.shape and torch.equal(back, x.detach()))
        w = torch.randn(x.shape, generator=g)
        (back * w).sum().backward()
        grads_ok.append(torch.equal(x.grad, w))
    return {"round_trip": ok, "round_trip_grad": grads_ok, "received_own_experts": local_ok}


def _errors(tmp: Path, rank: int) -> dict:
    """Bad input must raise DistError on every rank (no rank may be left waiting in a collective)."""
    bad_experts = CFG.replace(n_routed_experts=9, n_group=1, topk_group=1)
    cases = {  # name: (ep, dp, model config, train config)
        "mismatch": (1, "ddp", CFG, TrainConfig(out=str(tmp), steps=1, lr=3e-3 if rank == 0 else 1e-3)),
        "ep_not_dividing_world": (3, "ddp", CFG, TrainConfig(out=str(tmp), steps=1)),
        "ep_not_dividing_experts": (2, "fsdp", bad_experts, TrainConfig(out=str(tmp), steps=1)),
    }
    out = {}
    for name, (ep, dp, model_cfg, train_cfg) in cases.items():
        try:
            Parallel.from_env(device="cpu", ep=ep, dp=dp, timeout_s=60).check(model_cfg, train_cfg)
            out[name] = "no error"
        except DistError as e:
            out[name] = str(e)
    return out


def _worker(rank: int, tmp: Path, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    res: dict = {"seconds": {}}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        res["seconds"][name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    try:
        Parallel.from_env(device="cpu", timeout_s=60)  # joins the process group every run below reuses
        lap("join")
        res.update(_round_trips(rank))
        lap("round_trips")
        for name, ep, dp, batch, accum in [("dp_ddp_accum", 1, "ddp", 1, 2), ("dp_fsdp", 1, "fsdp", 2, 1)]:
            tr = _trainer(
                tmp, name, Parallel.from_env(device="cpu", ep=ep, dp=dp, timeout_s=60), batch, accum
            )
            res[name] = _train(tr)
            res[f"{name}_bias"] = _biases(tr.model)
            lap(name)
        # expert parallel through the real loop: metrics.jsonl, DCP checkpoints at steps 2 and 4
        tr = _trainer(tmp, "ep_fsdp", Parallel.from_env(device="cpu", ep=2, dp="fsdp", timeout_s=60), 2)
        tr.fit()
        res["ep_fsdp_bias"] = _biases(tr.model)
        full = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tr.model.state_dict().items()
        }
        torch.save(full, tmp / f"ep_fsdp_rank{rank}.pt")  # experts: this rank's slice; the rest: whole
        lap("ep_fsdp")
        # 1 -> 2: resume the single-process DCP checkpoint (step 2) with EP over DDP
        tr = _trainer(tmp, "one_to_two", Parallel.from_env(device="cpu", ep=2, dp="ddp", timeout_s=60), 2)
        res["one_to_two_resumed"] = tr.resume()
        res["one_to_two"] = _train(tr)
        res["one_to_two_bias"] = _biases(tr.model)
        lap("one_to_two")
        res["errors"] = _errors(tmp, rank)
        lap("errors")
    except Exception:
        res["traceback"] = traceback.format_exc()
        raise
    finally:
        (tmp / f"rank{rank}.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16).tofile(tmp / "tokens.bin")
    ref = _trainer(tmp, "reference")
    reference = _train(ref)
    single = _trainer(tmp, "one_to_two", Parallel())  # one process writing DCP checkpoints
    single.fit(stop_at=2)
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(tmp, _free_port()), nprocs=2)
    spawn_s = time.perf_counter() - t0
    # 2 -> 1: the EP+FSDP run's step-2 checkpoint, continued by one plain process
    (tmp / "two_to_one" / "dcp").mkdir(parents=True)
    shutil.copytree(tmp / "ep_fsdp" / "dcp" / "step_0000002", tmp / "two_to_one" / "dcp" / "step_0000002")
    back = _trainer(tmp, "two_to_one", Parallel())
    resumed = back.resume()
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    losses = {
        name: {int(k): v for k, v in ranks[0][name].items()}
        for name in ("dp_ddp_accum", "dp_fsdp", "one_to_two")
    }
    losses.update(reference=reference, ep_fsdp=_losses(tmp / "ep_fsdp"), two_to_one=_train(back))
    return {
        "tmp": tmp,
        "ranks": ranks,
        "losses": losses,
        "reference_bias": _biases(ref.model),
        "two_to_one_resumed": resumed,
        "spawn_s": spawn_s,
    }


def _assert_losses_match(runs, name: str, steps=range(1, STEPS + 1)) -> None:
    ref, got = runs["losses"]["reference"], runs["losses"][name]
    assert sorted(got) == list(steps), (name, sorted(got))
    for s in steps:
        assert abs(got[s] - ref[s]) <= TOL, (name, s, got[s], ref[s])


# ---- equivalence with one process ------------------------------------------------------------------------
def test_data_parallel_ddp_with_accumulation_matches_one_process(runs):
    _assert_losses_match(runs, "dp_ddp_accum")


def test_data_parallel_fsdp_matches_one_process(runs):
    _assert_losses_match(runs, "dp_fsdp")


def test_expert_parallel_matches_one_process(runs):
    _assert_losses_match(runs, "ep_fsdp")


def test_all_ranks_hold_identical_routing_biases_equal_to_one_process(runs):
    reference = runs["reference_bias"]
    for name in ("dp_ddp_accum", "dp_fsdp", "ep_fsdp", "one_to_two"):
        b0, b1 = runs["ranks"][0][f"{name}_bias"], runs["ranks"][1][f"{name}_bias"]
        assert b0 == b1, name
        assert np.allclose(b0, reference, atol=1e-7), name
    assert any(v != 0 for layer in b0 for v in layer)  # the biases did move


# ---- expert-parallel all-to-all ------------------------------------------------------------------------
def test_dispatch_combine_is_an_exact_round_trip_for_random_routings(runs):
    for r in runs["ranks"]:
        assert all(r["round_trip"]) and len(r["round_trip"]) == 6
        assert all(r["round_trip_grad"])
        assert all(r["received_own_experts"])


def test_all_to_all_bytes_are_logged_and_match_the_routing(runs):
    recs = [json.loads(line) for line in open(runs["tmp"] / "ep_fsdp" / "metrics.jsonl")]
    steps = [r for r in recs if "a2a_bytes" in r]
    assert len(steps) == STEPS
    # Upper bound: every (token, expert) row crosses the wire both ways, forward and backward; MoE layers:
    # layer 1 (T tokens) and the MTP block (T-1 tokens); fp32 rows of hidden_size; plus the count exchange.
    rows = GLOBAL_BATCH * (SEQ + SEQ - 1) * CFG.num_experts_per_tok
    bound = rows * 2 * 2 * CFG.hidden_size * 4 + 2 * 2 * 16 * 8
    for r in steps:
        assert 0.25 * bound < r["a2a_bytes"] < bound  # about half the rows are remote with 2 ranks
    assert a2a_bytes_per_token(get_preset("deepseek-v3"), 4)["dispatch"] == 4 * (7168 + 7168 / 128 * 4)


# ---- distributed checkpoints -----------------------------------------------------------------------------
def test_dcp_saved_on_two_ranks_resumes_on_one(runs):
    assert runs["two_to_one_resumed"]
    _assert_losses_match(runs, "two_to_one", steps=(3, 4))


def test_dcp_saved_on_one_process_resumes_on_two_ranks_with_expert_parallelism(runs):
    assert runs["ranks"][0]["one_to_two_resumed"] and runs["ranks"][1]["one_to_two_resumed"]
    _assert_losses_match(runs, "one_to_two", steps=(3, 4))


def test_export_writes_a_single_file_checkpoint_of_the_global_model(runs, tmp_path):
    tmp = runs["tmp"]
    export_single(tmp / "ep_fsdp" / "dcp" / "step_0000004", tmp_path / "exported")
    got = load_model(tmp_path / "exported").state_dict()
    shards = [torch.load(tmp / f"ep_fsdp_rank{r}.pt") for r in range(2)]
    assert sorted(got) == sorted(shards[0])
    for k, v in got.items():
        if ".experts." in k:  # the global tensor is the ranks' slices in order
            assert torch.equal(v, torch.cat([shards[0][k], shards[1][k]])), k
        else:
            assert torch.equal(v, shards[0][k]) and torch.equal(v, shards[1][k]), k
    # and a plain single-process trainer continues from it
    tr = _trainer(tmp, str(tmp_path / "exported"))
    assert tr.resume() and tr.step == 4


def test_export_command_takes_a_run_folder(runs, tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["export", "--run", str(runs["tmp"] / "ep_fsdp"), "--out", str(tmp_path / "one")]) == 0
    assert "step_0000004" in capsys.readouterr().out
    assert (tmp_path / "one" / "checkpoints" / "step_0000004" / "model.safetensors").exists()
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "two")]) == 2
    assert "no distributed checkpoint" in capsys.readouterr().err


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_distributed_input_raises_a_clear_error_on_every_rank(runs):
    for r in runs["ranks"]:
        err = r["errors"]
        assert "rank 1 was started with a different configuration" in err["mismatch"]
        assert "train.lr" in err["mismatch"]
        assert "does not divide the world size 2" in err["ep_not_dividing_world"]
        assert "does not divide the 9 routed experts" in err["ep_not_dividing_experts"]


def test_validate_layout_names_the_problem():
    validate_layout(4, 2, 16, 1, "fsdp")
    with pytest.raises(DistError, match="does not divide the world size"):
        validate_layout(3, 2, 16, 1, "fsdp")
    with pytest.raises(DistError, match="routed experts"):
        validate_layout(6, 6, 16, 1, "ddp")
    with pytest.raises(DistError, match="no MoE layer"):
        validate_layout(2, 2, 16, 0, "ddp")
    with pytest.raises(DistError, match="unknown mode"):
        validate_layout(2, 1, 16, 1, "zero3")


def test_missing_rendezvous_times_out_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    t0 = time.perf_counter()
    with pytest.raises(DistError, match="rendezvous failed on rank 0 of 2"):
        Parallel.from_env(device="cpu", timeout_s=1)
    assert time.perf_counter() - t0 < 30


def test_world_size_without_a_rendezvous_address_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistError, match="launch with torchrun"):
        Parallel.from_env(device="cpu")


# ---- slow: torchrun end to end, elastic restart, expert replicas -------------------------------------------
def _corpus(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while experts route tokens across ranks".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        lines = [" ".join(rng.choice(words, 12)) + "." for _ in range(150)]
        (folder / f"part{i:02d}.txt").write_text("\n".join(lines))
    return folder


def _torchrun(args: list[str], out: Path, port: int, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        *extra,
        "-m",
        "nanoseek",
        "train",
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-every",
        "100",
        "--no-progress",
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "NANOSEEK_CACHE": str(out.parent / "cache")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_torchrun_elastic_restart_after_a_killed_rank_loses_nothing(tmp_path):
    data = _corpus(tmp_path / "corpus")
    common = ["--data", str(data), "--steps", "10", "--ckpt-every", "3", "--ep", "2"]
    clean = _torchrun(common, tmp_path / "clean", _free_port())
    assert clean.wait(timeout=300) == 0, clean.stdout.read()
    run = tmp_path / "killed"
    proc = _torchrun(common, run, _free_port(), ["--max-restarts", "1"])
    deadline = time.time() + 240
    while not (run / "dcp" / "step_0000003" / "state.json").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint"
        time.sleep(0.2)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(workers[-1]), 9)  # SIGKILL one rank mid-run
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "resumed from" in output
    assert _losses(run) == _losses(tmp_path / "clean")


@pytest.mark.slow
def test_four_ranks_with_two_expert_replicas_match_one_process(tmp_path):
    """W=4, ep=2: each expert lives on 2 ranks, whose gradients are all-reduced over the replica group."""
    np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    reference = _train(_trainer(tmp_path, "reference"))
    mp.spawn(_replica_worker, args=(tmp_path, _free_port()), nprocs=4)
    for dp in ("fsdp", "ddp"):
        got = json.loads((tmp_path / f"ep2x2_{dp}.json").read_text())
        for step, loss in reference.items():
            assert abs(got[str(step)] - loss) <= TOL, (dp, step)


def _replica_worker(rank: int, tmp: Path, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    for dp in ("fsdp", "ddp"):
        losses = _train(
            _trainer(tmp, f"ep2x2_{dp}", Parallel.from_env(device="cpu", ep=2, dp=dp, timeout_s=120), batch=1)
        )
        if rank == 0:
            (tmp / f"ep2x2_{dp}.json").write_text(json.dumps(losses))
