"""Scaling laws in DeepSeek LLM's method (arXiv 2401.02954 §3): family, sweep, fits, report. See docs/scaling.md."""
