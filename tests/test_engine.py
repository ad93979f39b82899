"""The inference engine (nanoseek/infer/engine.py): cache decode == recompute, continuous batching, stop rules,
cancellation, memory accounting, loading."""

import pytest
import torch
from infer_models import VOCAB, counting_model, one_thread, random_model, tokenizer  # noqa: F401

import nanoseek
from nanoseek.accounting import kv_elements_per_layer
from nanoseek.infer import Engine, EngineError, SamplingError, SamplingParams
from nanoseek.infer.engine import load

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = [[5, 6, 7, 8, 9], [40], list(range(100, 123)), [7, 7, 7]]


def recompute_logprobs(model, prompt, output) -> torch.Tensor:
    """log p(output_i | prompt, output_<i) from one full forward without a cache."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    n = len(prompt)
    return logp[n - 1 : n - 1 + len(output)].gather(1, torch.tensor(output).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("attention,full_kv", [("mla", False), ("mla", True), ("mha", False), ("gqa", False)])
def test_cached_decode_equals_full_recompute(attention, full_kv):
    changes = {"attention": attention}
    if attention == "gqa":
        changes["n_kv_heads"] = 1
    model = random_model(**changes)
    engine = Engine(model, max_batch=3, max_len=64, full_kv=full_kv)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0)
    for req in engine.generate(PROMPTS[:3], params):
        got = torch.tensor([lp.logprob for lp in req.logprobs])
        ref = recompute_logprobs(model, req.prompt, req.output)
        assert (got - ref).abs().max() <= 1e-4


def test_continuous_batching_gives_each_sequence_its_solo_tokens():
    model = random_model()
    lengths = [12, 3, 9, 1, 7, 5]
    prompts = [[10 + i, 20 + i, 30 + i][: 1 + i % 3] + list(range(50, 50 + i)) for i in range(6)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
    solo = [
        Engine(model, max_batch=1, max_len=64).generate([p], sp)[0].output for p, sp in zip(prompts, params)
    ]
    engine = Engine(model, max_batch=2, max_len=64)  # 6 requests through 2 slots: they join and leave
    reqs = engine.generate(prompts, params)
    assert [r.output for r in reqs] == solo
    assert [len(r.output) for r in reqs] == lengths
    assert engine.free_slots == 2 and engine.cache_tokens_in_use == 0


def test_requests_join_a_running_batch_between_decode_steps():
    model = random_model()
    engine = Engine(model, max_batch=4, max_len=64)
    first = engine.add([1, 2, 3], SamplingParams(max_tokens=10, temperature=0))
    for _ in range(4):
        engine.step()
    late = engine.add([9, 8], SamplingParams(max_tokens=6, temperature=0))
    while not (first.finished and late.finished):
        engine.step()
    alone = Engine(model, max_batch=1, max_len=64)
    assert late.output == alone.generate([[9, 8]], SamplingParams(max_tokens=6, temperature=0))[0].output
    assert first.output == alone.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0))[0].output


@pytest.mark.parametrize("which", ["trained", "random"])
def test_speculative_greedy_equals_plain_greedy_token_for_token(which):
    # the trained model accepts most drafts, the random one rejects most: both branches are exercised
    model = counting_model() if which == "trained" else random_model()
    prompts = [[40, 41, 42], [200], list(range(60, 90)), [250, 251]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = Engine(model, max_batch=4, max_len=64).generate(prompts, params)
    engine = Engine(model, max_batch=2, max_len=64, speculative=True)
    spec = engine.generate(prompts, params)
    assert [r.output for r in spec] == [r.output for r in plain]
    rate = engine.stats.acceptance_rate
    assert rate > 0.8 if which == "trained" else rate < 0.5
    assert engine.free_slots == 2


def test_speculative_sampling_with_a_seed_is_reproducible():
    model = counting_model()
    params = SamplingParams(max_tokens=15, temperature=0.7, top_p=0.95, seed=3, ignore_eos=True)
    a = Engine(model, max_batch=2, max_len=64, speculative=True).generate([[40, 41]], params)[0].output
    b = Engine(model, max_batch=2, max_len=64, speculative=True).generate([[40, 41]], params)[0].output
    assert a == b and len(a) == 15


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch():
    model = random_model()
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=1234)
    alone = Engine(model, max_batch=1, max_len=64).generate([[3, 4, 5]], params)[0].output
    others = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (1, 2)]
    batch = Engine(model, max_batch=3, max_len=64).generate(
        [[9], [3, 4, 5], [1, 1]], [others[0], params, others[1]]
    )
    assert batch[1].output == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=99)
    assert Engine(model, max_batch=1, max_len=64).generate([[3, 4, 5]], other_seed)[0].output != alone


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = random_model()
    engine = Engine(model, max_batch=4, max_len=64)
    greedy = engine.generate(PROMPTS, GREEDY)
    for params in (SamplingParams(max_tokens=12, top_k=1), SamplingParams(max_tokens=12, top_p=1e-6)):
        assert [r.output for r in engine.generate(PROMPTS, params)] == [r.output for r in greedy]


def test_max_tokens_and_stop_tokens_end_a_request():
    model = random_model()
    engine = Engine(model, max_batch=2, max_len=64)
    ref = engine.generate([[5, 6]], GREEDY)[0]
    assert ref.finish_reason == "length" and len(ref.output) == 12 and ref.num_generated == 12
    stop_at = ref.output[4]
    cut = ref.output.index(stop_at)
    req = engine.generate([[5, 6]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0]
    assert req.finish_reason == "stop" and req.output == ref.output[:cut]  # the stop token is not output
    assert req.num_generated == cut + 1  # ... but counts as generated


def test_stop_strings_cut_the_text_and_never_reach_a_stream():
    tok = tokenizer()
    model = random_model()
    engine = Engine(model, tok, max_batch=2, max_len=96)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    text = engine.generate([tok.encode("To be, or")], params)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    deltas = list(engine.stream(tok.encode("To be, or"), params))
    streamed = "".join(d.text for d in deltas)
    assert streamed == text[: text.index(stop)]
    assert deltas[-1].finished and deltas[-1].request.finish_reason == "stop"
    assert deltas[-1].request.text == streamed
    assert engine.free_slots == 2


def test_eos_stops_unless_ignored():
    tok = tokenizer()
    model = random_model()
    engine = Engine(model, tok, max_batch=1, max_len=64)
    out = engine.generate([[5, 6]], GREEDY)[0].output
    engine.eos_ids = frozenset({out[2]})  # pretend the tokenizer's EOS is the third token
    assert engine.generate([[5, 6]], GREEDY)[0].finish_reason == "stop"
    ignore = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert engine.generate([[5, 6]], ignore)[0].output == out


def test_repetition_penalty_discourages_seen_tokens():
    model = counting_model()  # without a penalty it counts on: 60, 61, 62, ...
    prompt = list(range(40, 60))
    params = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.0)
    assert Engine(model, max_len=64).generate([prompt], params)[0].output == list(range(60, 68))
    seen = set(prompt)
    penalized = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1e6)  # seen tokens never win
    out = Engine(model, max_len=64).generate([prompt], penalized)[0].output
    for t in out:
        assert t not in seen
        seen.add(t)


def test_logprobs_report_the_raw_distribution_and_its_top_tokens():
    model = random_model()
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=0, logprobs=3)
    req = Engine(model, max_len=64).generate([[11, 12, 13]], params)[0]
    ref = recompute_logprobs(model, req.prompt, req.output)
    for lp, r, t in zip(req.logprobs, ref, req.output):
        assert lp.token == t and abs(lp.logprob - float(r)) <= 1e-4
        values = [v for _, v in lp.top]
        assert len(values) == 3 and values == sorted(values, reverse=True) and values[0] >= lp.logprob - 1e-5


def test_cancel_frees_the_slot_at_once():
    engine = Engine(random_model(), max_batch=2, max_len=64)
    a = engine.add([1, 2, 3], SamplingParams(max_tokens=30, temperature=0))
    b = engine.add([4, 5], SamplingParams(max_tokens=30, temperature=0))
    waiting = engine.add([6], SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    engine.step()
    assert engine.free_slots == 0 and engine.cache_tokens_in_use > 0
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and engine.free_slots == 1
    engine.cancel(waiting)  # never started
    assert waiting.finish_reason == "cancelled" and not engine.waiting
    while not b.finished:
        engine.step()
    assert engine.free_slots == 2 and not engine.has_work()


def test_closing_a_stream_cancels_its_request():
    engine = Engine(random_model(), max_batch=1, max_len=64)
    stream = engine.stream([1, 2], SamplingParams(max_tokens=30, temperature=0))
    next(stream)
    assert engine.free_slots == 0
    stream.close()
    assert engine.free_slots == 1


@pytest.mark.parametrize("attention,full_kv", [("mla", False), ("mla", True), ("mha", False), ("gqa", False)])
def test_bytes_per_token_equal_the_theory(attention, full_kv):
    changes = {"attention": attention, **({"n_kv_heads": 1} if attention == "gqa" else {})}
    model = random_model(**changes)
    cfg = model.cfg
    engine = Engine(model, max_batch=3, max_len=50, full_kv=full_kv)
    if full_kv:  # [M] naive: every head's K (nope + rope) and V
        per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        per_layer = kv_elements_per_layer(cfg)  # MLA: kv_lora_rank + qk_rope_head_dim
    assert engine.bytes_per_token == cfg.num_hidden_layers * per_layer * 4  # fp32
    assert engine.cache_bytes == engine.bytes_per_token * 3 * 51  # slots x (max_len + 1 spare position)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))


def test_requests_out_of_range_are_refused_with_a_clear_error():
    engine = Engine(random_model(), max_batch=1, max_len=32)
    with pytest.raises(EngineError, match="exceeds the context of 32"):
        engine.add(list(range(30)), SamplingParams(max_tokens=5))
    with pytest.raises(EngineError, match="token ids"):
        engine.add([VOCAB], SamplingParams(max_tokens=5))
    with pytest.raises(EngineError, match="at least one token"):
        engine.add([], SamplingParams(max_tokens=5))
    with pytest.raises(EngineError, match="tokenizer"):
        engine.add([1], SamplingParams(max_tokens=5, stop=["x"]))
    for bad in (
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"repetition_penalty": 0},
    ):
        with pytest.raises(SamplingError, match=next(iter(bad))):
            engine.add([1], SamplingParams(**bad))
    with pytest.raises(ValueError, match="MTP"):
        Engine(random_model(num_nextn_predict_layers=0), speculative=True)


def test_load_reads_hugging_face_folders_and_nanoseek_runs(tmp_path):
    from nanoseek.train.checkpoint import save_checkpoint

    model, tok = random_model(), tokenizer()
    hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    nanoseek.save_hf(model, hf_dir)
    tok.save(hf_dir / "tokenizer.json")
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(run_dir, 5, model, config=model.cfg.to_dict(), tokenizer_path=tmp_path / "tokenizer.json")
    ref = Engine(model, max_len=32).generate([[1, 2, 3]], GREEDY)[0].output
    for path in (hf_dir, run_dir):
        loaded, loaded_tok = load(path)
        assert loaded_tok.sha256 == tok.sha256
        assert Engine(loaded, loaded_tok, max_len=32).generate([[1, 2, 3]], GREEDY)[0].output == ref
    with pytest.raises(ValueError, match="tokenizer.json"):
        (hf_dir / "tokenizer.json").unlink()
        load(hf_dir)
