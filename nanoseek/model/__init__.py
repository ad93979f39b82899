"""The DeepSeek-V3 model: one module per idea (rope, mla, attention, moe, mtp), assembled in transformer."""

from nanoseek.model.transformer import Block, ModelOutput, Transformer

__all__ = ["Block", "ModelOutput", "Transformer"]
