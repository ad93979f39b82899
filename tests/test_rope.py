import math

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq, yarn_correction_range


def test_rope_rotates_adjacent_pairs():
    x = torch.zeros(1, 1, 8)
    x[..., 0] = 1.0  # pair (0, 1) holds (1, 0)
    rope = RotaryEmbedding(8, 10000.0)
    cos, sin = rope(torch.tensor([[3]]))
    y = apply_rope(x, cos, sin)
    # the first pair is rotated by angle 3 * theta_0 = 3 rad; the rest stays 0
    assert y[0, 0, 0].item() == pytest.approx(math.cos(3.0), abs=1e-6)
    assert y[0, 0, 1].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert y[0, 0, 2:].abs().max() == 0


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q.view(1, 1, 16), cq, sq) * apply_rope(k.view(1, 1, 16), ck, sk)).sum()

    assert score(7, 3) == pytest.approx(score(104, 100).item(), rel=1e-5)


def test_yarn_v3_correction_range_and_frequencies():
    cfg = get_preset("deepseek-v3")
    assert yarn_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)  # REFERENCE §4
    plain, _ = rope_inv_freq(64, 10000.0, None)
    yarn, factor = rope_inv_freq(64, 10000.0, cfg.yarn)
    assert factor == 1.0  # mscale == mscale_all_dim: no magnitude factor on cos/sin
    torch.testing.assert_close(yarn[:11], plain[:11])
    torch.testing.assert_close(yarn[23:], plain[23:] / 40)
    assert ((yarn[11:23] < plain[11:23]) & (yarn[11:23] > plain[11:23] / 40)).all()


def test_rope_preserves_norm_and_dtype():
    rope = RotaryEmbedding(16, 10000.0)
    x = torch.randn(2, 5, 3, 16, dtype=torch.bfloat16)
    cos, sin = rope(torch.arange(5).expand(2, 5))
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=2e-2)
