"""The speedrun's post-training stages (nanoseek/post/stages.py): SFT then GRPO from a pretrained run folder,
and the report section with the before/after table, plots and traces."""

import torch
from post_helpers import one_thread, save_run

from nanoseek.post.stages import post_training


def test_quick_post_training_writes_sft_and_grpo_runs_and_a_report_section(tmp_path):
    threads = one_thread()
    try:
        run = save_run(tmp_path / "run")
        lines = post_training(run, quick=True, log=lambda *a: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    text = "\n".join(lines)
    for needle in (
        "## Post-training",
        "after SFT, before RL",
        "greedy pass@1",
        "pass@2",
        "grpo/rewards.png",
        "Sample traces",
    ):
        assert needle in text, needle
    assert (run / "sft" / "checkpoints").is_dir() and (run / "grpo" / "checkpoints").is_dir()
    assert (run / "grpo" / "rewards.png").stat().st_size > 1000 and (run / "grpo" / "length.png").exists()


def test_rl_task_is_the_one_with_most_room_among_the_partly_solved():
    from nanoseek.post.stages import choose_rl_task

    # A typical SFT model: 2-digit sums half solved with a wide pass@8 gap; 3-digit ones barely, narrow gap.
    assert choose_rl_task([("a2", 0.33, 0.52), ("a3", 0.22, 0.31), ("a4", 0.13, 0.16)]) == "a2"
    # A strong one: 2-digit sums solved (94%) -> skipped even though allowed, 3-digit sums have the most room.
    assert choose_rl_task([("a2", 0.94, 0.99), ("a3", 0.74, 0.92), ("a4", 0.35, 0.45)]) == "a3"
    # Everything solved beyond the cap: the hardest task.
    assert choose_rl_task([("a2", 0.99, 1.0), ("a3", 0.95, 1.0)]) == "a3"


def test_probe_reports_greedy_and_pass_k_per_task(tmp_path):
    from nanoseek.post.stages import probe_tasks

    threads = one_thread()
    try:
        run = save_run(tmp_path / "run")
        rows = probe_tasks(run, ("add:digits=1", "add:digits=2"), problems=4, k=2)
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in rows] == ["add:digits=1", "add:digits=2"]
    assert all(0.0 <= greedy <= 1.0 and 0.0 <= passk <= 1.0 for _, greedy, passk in rows)
