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
