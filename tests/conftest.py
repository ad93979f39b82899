import pytest
import torch

from nanoseek.config import get_preset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """The tiny preset shrunk further for unit tests (vocab 256, short context)."""
    return get_preset("tiny").replace(vocab_size=256, max_position_embeddings=128)
