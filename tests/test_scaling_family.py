import pytest

from nanoseek.accounting import count_flops, deepseek_llm_m
from nanoseek.scaling.family import Family, FamilyError, describe


def test_dense_family_is_deepseek_llm_so_m_matches_eq2_exactly():
    f = Family(seq_len=128)
    for n_layer, d in [(1, 48), (2, 96), (4, 192)]:  # 3 divides 8d: the SwiGLU width 8d/3 is exact
        assert f.m(n_layer, d) == deepseek_llm_m(n_layer, d, 128)


def test_m_is_the_configs_own_count_and_the_rule_sets_the_shape():
    f = Family(aspect=32, head_dim=16, seq_len=64)
    cfg = f.for_m(2e6)
    assert count_flops(cfg, 64).m == f.m(cfg.num_hidden_layers, cfg.hidden_size)
    assert cfg.hidden_size % 16 == 0 and cfg.num_attention_heads * 16 == cfg.hidden_size
    assert 0.5 < describe(cfg, 64)["m"] / 2e6 < 1.5
    assert cfg.num_nextn_predict_layers == 0 and not cfg.tie_word_embeddings


def test_sizes_grow_in_m_and_depth_never_shrinks_with_the_target():
    f = Family(head_dim=8)
    sizes = f.sizes(2e4, 3e6, 8)
    ms = [f.m(c.num_hidden_layers, c.hidden_size) for c in sizes]
    assert ms == sorted(ms) and len(set(ms)) == len(ms) and len(sizes) >= 6
    depths = [f.for_m(t).num_hidden_layers for t in (1e4, 1e5, 1e6, 1e7)]
    assert depths == sorted(depths)


def test_moe_family_counts_activated_experts_and_matches_the_mla_family_in_m():
    moe, mla = Family(kind="moe"), Family(kind="mla")
    cfg = moe.config(2, 144)
    assert cfg.ffn == "moe" and cfg.num_experts_per_tok == 2 and cfg.first_k_dense_replace == 1
    # 2 routed + 1 shared experts of width 8d/9 = the dense 8d^2 per layer; only the router's FLOPs differ
    assert moe.m(2, 144) == pytest.approx(mla.m(2, 144), rel=0.02)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Family(kind="sparse"), "unknown kind"),
        (lambda: Family(seq_len=0), "seq_len"),
        (lambda: Family().config(2, 20), "multiple of head_dim"),
        (lambda: Family().for_m(-1), "positive"),
        (lambda: Family().sizes(1e6, 1e5, 3), "M_low <= M_high"),
    ],
)
def test_bad_requests_raise_one_clear_error(make, match):
    with pytest.raises(FamilyError, match=match):
        make()
