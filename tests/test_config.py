import json

import pytest

from nanoseek.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    from_hf_dict,
    get_preset,
    resolve_config,
    to_hf_dict,
)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    cfg = get_preset(name)
    assert cfg.name == name


def test_v3_preset_matches_published_config():
    c = get_preset("deepseek-v3")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (7168, 61, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (256, 1, 8)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.first_k_dense_replace) == (8, 4, 2.5, 3)
    assert c.vocab_size == 129280 and c.num_nextn_predict_layers == 1
    # REFERENCE §3: 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.135234
    assert c.softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_json_round_trip(tmp_path):
    cfg = get_preset("small").replace(attention="gqa", n_kv_heads=2)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert resolve_config(str(tmp_path / "c.json")) == cfg


def test_hf_config_round_trip(tmp_path):
    cfg = get_preset("deepseek-v3")
    d = to_hf_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = ModelConfig.load(tmp_path)
    for f in (
        "hidden_size",
        "q_lora_rank",
        "n_group",
        "topk_group",
        "rope_scaling",
        "num_nextn_predict_layers",
    ):
        assert getattr(back, f) == getattr(cfg, f), f


def test_hf_v5_rope_parameters_and_null_q_lora():
    d = to_hf_dict(get_preset("deepseek-v3"))
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = {
        "rope_theta": 5000.0,
        "rope_type": "yarn",
        **{k: v for k, v in rs.items() if k != "type"},
    }
    d["q_lora_rank"] = None
    cfg = from_hf_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 40 and cfg.q_lora_rank == 0


BAD = [
    (dict(topk_group=9), "topk_group"),
    (dict(n_routed_experts=250), "n_group"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(v_head_dim=1.5), "v_head_dim"),
    (dict(rms_norm_eps="small"), "rms_norm_eps"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(rope_scaling=[1, 2]), "rope_scaling"),
    (dict(attention="flash"), "attention"),
    (dict(ffn="sparse"), "ffn"),
    (dict(balancing="magic"), "balancing"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(attention="gqa", n_kv_heads=None), "n_kv_heads"),
    (dict(attention="gqa", n_kv_heads=3), "n_kv_heads"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling.factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(bias_update_speed=-1), "bias_update_speed"),
    (dict(mtp_lambda=-0.1), "mtp_lambda"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        get_preset("tiny").replace(**change)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_json_field_is_rejected(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**get_preset("tiny").to_dict(), "hiden_size": 3}))
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.load(p)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="preset"):
        resolve_config("no-such-preset")
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict({"model_type": "llama"})


def test_greedy_routing_ignores_groups_in_capacity_check():
    # V2-Lite style: no group limit, so all experts are available.
    get_preset("tiny").replace(topk_method="greedy", n_group=4, topk_group=1, num_experts_per_tok=8)
