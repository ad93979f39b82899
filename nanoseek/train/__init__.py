"""Pretraining: optimizer and LR schedules, atomic checkpoints, the training loop, the speedrun report."""
