"""SFT (nanoseek/post/sft.py): data loading, one-example and packed rows with assistant-only labels, resumable loader,
and a short run on the shared trainer that starts from the init weights and learns."""

import json

import pytest
import torch
from post_helpers import one_thread, save_run, small_cfg, tokenizer

from nanoseek.model import Transformer
from nanoseek.post.chat import IGNORE
from nanoseek.post.sft import (
    SFTDataError,
    SFTLoader,
    build_sft_trainer,
    encode_all,
    load_conversations,
    task_conversations,
)
from nanoseek.post.tasks import make_task
from nanoseek.train.trainer import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = one_thread()
    yield
    torch.set_num_threads(threads)


def _examples(n=40):
    return encode_all(tokenizer(), task_conversations(make_task("mul:digits=2"), n), 200)[0]


def test_packing_never_splits_an_example_and_pads_with_ignored_labels():
    examples = _examples()
    loader = SFTLoader(examples, batch_size=4, seq_len=63, seed=0, pad_id=2, pack=True)
    rows = loader.rows(0)
    assert sorted(len(r[0]) for r in rows)[-1] <= 64
    assert sum(len(r[0]) for r in rows) == sum(len(x) for x, _ in examples)  # every token exactly once
    bos = tokenizer().bos_id
    for ids, _ in rows:
        assert ids[0] == bos  # rows begin at an example boundary
    x, y = next(loader)
    assert x.shape == y.shape == (4, 63)


def test_unpacked_rows_hold_one_example_each():
    examples = _examples()
    loader = SFTLoader(examples, batch_size=len(examples), seq_len=63, seed=0, pad_id=2)
    assert sorted(map(tuple, (r[0] for r in loader.rows(0)))) == sorted(tuple(x) for x, _ in examples)
    x, y = next(loader)
    bos = tokenizer().bos_id
    assert (x[:, 0] == bos).all() and ((x == bos).sum(1) == 1).all()


def test_loader_targets_are_next_token_labels_and_padding_is_ignored():
    examples = _examples(1)
    (ids, labels) = examples[0]
    loader = SFTLoader(examples, batch_size=1, seq_len=len(ids) + 5, seed=0, pad_id=2)
    x, y = next(loader)
    n = len(ids)
    assert x[0, :n].tolist() == ids and (x[0, n:] == 2).all()
    assert y[0, : n - 1].tolist() == labels[1:] and (y[0, n - 1 :] == IGNORE).all()


def test_loader_resumes_where_it_stopped_and_reshuffles_each_epoch():
    examples = _examples()
    a = SFTLoader(examples, batch_size=3, seq_len=63, seed=1, pack=True)
    for _ in range(5):
        next(a)
    b = SFTLoader(examples, batch_size=3, seq_len=63, seed=1, pack=True)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [r[0] for r in a.rows(0)] != [r[0] for r in a.rows(1)]
    with pytest.raises(SFTDataError):
        SFTLoader(examples, 3, 31, seed=1).load_state_dict(a.state_dict())


def test_load_conversations_accepts_messages_and_prompt_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "c", "completion": "d"},
    ]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    convs = load_conversations(path)
    assert convs[1] == [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]


@pytest.mark.parametrize(
    "content,message",
    [("{oops\n", ":1: not valid JSON"), ('{"text": "x"}\n', ":1: expected"), ("\n", "no conversations")],
)
def test_bad_sft_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(SFTDataError, match=message):
        load_conversations(path)
    with pytest.raises(SFTDataError, match="cannot read"):
        load_conversations(tmp_path / "missing.jsonl")


def test_conversations_longer_than_a_row_are_dropped_and_counted():
    convs = task_conversations(make_task("mul:digits=2"), 10)
    convs.append([{"role": "user", "content": "9" * 500}, {"role": "assistant", "content": "x"}])
    examples, dropped = encode_all(tokenizer(), convs, 64)
    assert dropped == 1 and len(examples) == 10
    with pytest.raises(SFTDataError, match="fits"):
        encode_all(tokenizer(), convs[-1:], 64)


def test_sft_starts_from_the_init_weights_and_lowers_the_assistant_loss(tmp_path):
    base = Transformer(small_cfg(), seed=5)
    init = save_run(tmp_path / "base", base)
    cfg = TrainConfig(
        out=str(tmp_path / "sft"),
        seq_len=127,
        batch_size=8,
        steps=25,
        lr=3e-3,
        warmup_steps=2,
        eval_every=10**6,
        ckpt_every=10**6,
        device="cpu",
    )
    trainer = build_sft_trainer(
        str(init),
        task_conversations(make_task("mul:digits=2"), 300),
        cfg,
        log=lambda *a: None,
        progress=False,
    )
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), base.parameters()))
    trainer.fit()
    steps = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 1.0
    assert (tmp_path / "sft" / "tokenizer.json").exists() and (tmp_path / "sft" / "checkpoints").is_dir()
