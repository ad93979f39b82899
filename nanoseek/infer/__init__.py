"""Inference: the engine (cache slots, continuous batching, sampling, MTP speculative decoding), the chat template,
and the OpenAI-compatible server. See engine.py for the design."""

from nanoseek.infer.engine import Delta, Engine, EngineError, Request, load
from nanoseek.infer.sampling import SamplingError, SamplingParams

__all__ = ["Delta", "Engine", "EngineError", "Request", "SamplingError", "SamplingParams", "load"]
