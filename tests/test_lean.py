"""The lean decode step (nanoseek/infer/lean.py) computes what the model's own decode forward computes."""

import pytest
import torch
from infer_models import random_model

import nanoseek.infer.lean as lean_module
from nanoseek import hardware
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.engine import _rows
from nanoseek.infer.lean import LeanDecoder, supports
from nanoseek.model import Transformer
from nanoseek.model.layers import RMSNorm

CONFIGS = {
    "default": {},
    "no q_lora": {"q_lora_rank": 0},
    # kv_lora_rank 256 >> head dims: folding W_UK / W_UV would more than double those matrices, so they stay apart
    "unfolded": {"kv_lora_rank": 256},
    "unfolded, no q_lora": {"kv_lora_rank": 256, "q_lora_rank": 0},
    "yarn": {
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    },
    "softmax, one group": {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    "dense": {"ffn": "dense"},
    "no shared experts, tied": {"n_shared_experts": 0, "tie_word_embeddings": True},
}


def _prefilled(model, lengths, max_len=48):
    """Two identical caches holding random prompts of the given lengths, one row each."""
    ids = torch.randint(0, model.cfg.vocab_size, (len(lengths), max(lengths)))
    caches = model.make_cache(len(lengths), max_len), model.make_cache(len(lengths), max_len)
    for b, n in enumerate(lengths):
        for cache in caches:
            rows = [_rows(c, b, b + 1) for c in cache]
            model(ids[b : b + 1, :n], positions=torch.arange(n).view(1, n), cache=rows, absorb=False)
    return caches


@pytest.mark.parametrize("packed", [True, False], ids=["prepacked", "plain"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_step_equals_the_model_step(name, packed, monkeypatch):
    if packed and not hardware.packed_weights_available():
        pytest.skip("no prepacked oneDNN weights on this CPU (hardware.packed_weights_available)")
    monkeypatch.setattr(lean_module, "packed_weights_available", lambda: packed)
    model = random_model(**CONFIGS[name])
    with torch.no_grad():  # a trained-looking routing bias, so it takes part in expert selection
        for moe in model.moe_layers():
            moe.gate.e_score_bias.normal_(0.0, 0.05)
        for module in model.modules():  # norm weights away from 1: the lean step folds them into matrices
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    lean = LeanDecoder(model)
    assert (lean._head.packed is not None) == packed
    lengths = [9, 4, 13]
    ref_cache, lean_cache = _prefilled(model, lengths)
    assert supports(model, lean_cache)
    with torch.inference_mode():
        # batch 3, one token; batch 3, two tokens (speculative verify); batch 1, one token (no mask, expert loop);
        # 33 rows. Prepacked: the head at every size, the other matrices from 6 rows.
        for rows, S in [(3, 1), (3, 2), (1, 1), (1, 2), (3, 11)]:
            ids = torch.randint(0, model.cfg.vocab_size, (rows, S))
            pos = torch.tensor(lengths[:rows]).view(rows, 1) + torch.arange(S)
            ref_rows = [_rows(c, 0, rows) for c in ref_cache]
            lean_rows = [_rows(c, 0, rows) for c in lean_cache]
            ref = model(ids, positions=pos, cache=ref_rows)
            logits, hidden = lean.forward(ids, pos, lean_rows)
            assert (logits - ref.logits).abs().max() <= 1e-5
            assert (hidden - ref.hidden).abs().max() <= 1e-5
            for a, b in zip(ref_cache, lean_cache):  # the same latent and rope key were written
                assert (a.kv - b.kv).abs().max() <= 1e-5
            lengths = [n + S for n in lengths[:rows]] + lengths[rows:]


def test_float64_models_take_the_lean_path_too():
    model = random_model().double()
    ref_cache, lean_cache = _prefilled(model, [5, 8])
    ids, pos = torch.tensor([[3], [4]]), torch.tensor([[5], [8]])
    with torch.inference_mode():
        ref = model(ids, positions=pos, cache=ref_cache).logits
        got = LeanDecoder(model).forward(ids, pos, lean_cache)[0]
    # the model computes RoPE, RMSNorm and the router in fp32 whatever the dtype; the lean step keeps fp64
    assert got.dtype == torch.float64 and (got - ref).abs().max() <= 1e-6


def test_weights_changed_in_place_are_picked_up():
    """An optimizer step (fused AdamW bumps no version counter), load_state_dict and a hand edit + invalidate()."""
    model = random_model()
    lean = LeanDecoder(model)
    ids, pos = torch.tensor([[3]]), torch.tensor([[6]])

    def check():
        ref_cache, lean_cache = _prefilled(model, [6])
        with torch.inference_mode():
            ref = model(ids, positions=pos, cache=ref_cache).logits
            assert (lean.forward(ids, pos, lean_cache)[0] - ref).abs().max() <= 1e-5

    check()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(torch.randint(0, 300, (2, 8)), targets=torch.randint(0, 300, (2, 8))).loss.backward()
    opt.step()
    model.eval()
    check()
    model.load_state_dict(Transformer(model.cfg, seed=1).state_dict())
    check()
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)  # through .data: no version bump, so the caller says so
    lean.invalidate()
    check()


def test_engine_decodes_the_same_tokens_with_and_without_the_lean_path():
    model = random_model()
    prompts = [[5, 6, 7], [40], list(range(100, 120)), [9, 9]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    lean = Engine(model, max_batch=3, max_len=64)
    plain = Engine(model, max_batch=3, max_len=64, lean=False)
    assert lean.lean is not None and plain.lean is None
    assert [r.output for r in lean.generate(prompts, params)] == [
        r.output for r in plain.generate(prompts, params)
    ]


def test_prefill_through_the_lean_step_matches_the_model():
    """Ragged prompts right-padded to one length, as the engine prefills them: same hidden states and cache."""
    model = random_model()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 9))
    positions = torch.arange(9).expand(3, 9)
    ref_cache, lean_cache = model.make_cache(3, 16), model.make_cache(3, 16)
    with torch.inference_mode():
        ref = model(ids, positions=positions, cache=ref_cache, absorb=False)
        lean = LeanDecoder(model)
        hidden = lean.hidden(ids, positions, lean_cache)
        logits = lean.logits(hidden[:, -1])
    assert (hidden - ref.hidden).abs().max() <= 1e-5
    assert (logits - ref.logits[:, -1]).abs().max() <= 1e-5
    for a, b in zip(ref_cache, lean_cache):
        assert (a.kv[:, :9] - b.kv[:, :9]).abs().max() <= 1e-5


def test_prefills_with_big_score_tensors_take_the_model_forward(monkeypatch):
    model = random_model()
    prompts = [list(range(10, 30)), [7, 8]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = [r.output for r in Engine(model, max_batch=2, max_len=32, lean=False).generate(prompts, params)]
    engine = Engine(model, max_batch=2, max_len=32)
    assert engine.lean.can_prefill(2, 20)
    prefills = []  # the lean step's calls with more than one token per row

    def hidden(ids, positions, cache):
        if ids.shape[1] > 1:
            prefills.append(ids.shape)
        return LeanDecoder.hidden(engine.lean, ids, positions, cache)

    monkeypatch.setattr(engine.lean, "hidden", hidden)
    assert [r.output for r in engine.generate(prompts, params)] == want
    assert prefills == [(2, 20)]  # both prompts in one prefill
    monkeypatch.setattr(lean_module, "PREFILL_MAX_SCORES", 2 * 20 * 20 * model.cfg.num_attention_heads - 1)
    assert not engine.lean.can_prefill(2, 20)
    assert [r.output for r in engine.generate(prompts, params)] == want
    assert prefills == [(2, 20)]


def test_unsupported_models_and_caches_use_the_model_forward(monkeypatch):
    assert Engine(random_model(attention="gqa", n_kv_heads=1), max_batch=1, max_len=16).lean is None
    assert Engine(random_model(), max_batch=1, max_len=16, full_kv=True).lean is None
    assert Engine(random_model().to(torch.bfloat16), max_batch=1, max_len=16).lean is None
    assert Engine(random_model(kv_lora_rank=31), max_batch=1, max_len=16).lean is None
    monkeypatch.setattr(
        lean_module, "MAX_MODEL_BYTES", 1000
    )  # the decoder copies the weights: too big to copy
    assert Engine(random_model(), max_batch=1, max_len=16).lean is None


@pytest.mark.parametrize(
    "kw",
    [
        {},  # noaux_tc: groups ranked by the sum of their top-2 biased scores
        {"topk_method": "group_limited_greedy", "scoring_func": "softmax"},  # groups ranked by their max
        {"topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    ],
    ids=["noaux_tc", "group_limited_greedy", "greedy"],
)
def test_one_token_routing_on_python_floats_matches_the_gate(kw):
    from nanoseek.config import get_preset
    from nanoseek.infer.lean import _route_one
    from nanoseek.model.moe import Gate

    gate = Gate(get_preset("small").replace(**kw))
    gen = torch.Generator().manual_seed(0)
    gate.e_score_bias.normal_(0.0, 0.1, generator=gen)
    logits = torch.randn(200, gate.n_experts, generator=gen)
    scores = logits.sigmoid() if gate.scoring_func == "sigmoid" else logits.softmax(-1)
    idx, weights = gate.route(scores)
    bias = gate.e_score_bias.tolist()
    for t in range(len(scores)):
        experts, gates = _route_one(gate, scores[t].tolist(), bias)
        assert experts == idx[t].tolist()
        assert gates == pytest.approx(weights[t].tolist(), rel=1e-6)
