"""`nanoseek generate`, `nanoseek chat`, `nanoseek serve` (nanoseek/infer/commands.py), and the chat template
(nanoseek/infer/chat.py) they use."""

import io
import json

import pytest
from infer_models import one_thread, random_model, tokenizer  # noqa: F401

import nanoseek
from nanoseek.cli import main
from nanoseek.infer.chat import DEEPSEEK, NANOSEEK, ThinkSplitter, encode_chat, split_think


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    nanoseek.save_hf(random_model(), path)
    tokenizer().save(path / "tokenizer.json")
    return str(path)


def test_generate_json_reports_text_tokens_usage_and_timing(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "To be", "--max-tokens", "7", "--temperature", "0"]
    assert main([*args, "--json", "--max-len", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "length" and len(out["tokens"]) == 7
    assert out["usage"]["completion_tokens"] == 7 and out["usage"]["prompt_tokens"] >= 2
    assert out["text"] == tokenizer().decode(out["tokens"]) and out["tokens_per_second"] > 0
    assert main([*args, "--max-len", "64"]) == 0  # plain: streams the text
    assert capsys.readouterr().out == out["text"] + "\n"


def test_generate_speculative_gives_the_same_greedy_text(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "To be", "--max-tokens", "9", "--temperature", "0"]
    main([*args, "--json", "--max-len", "64"])
    plain = json.loads(capsys.readouterr().out)
    main([*args, "--json", "--max-len", "64", "--speculative"])
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == plain["tokens"] and 0 <= spec["speculative"]["acceptance_rate"] <= 1


def test_generate_reference_decode_gives_the_same_greedy_text(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--prompt", "To be", "--max-tokens", "9", "--temperature", "0"]
    main([*args, "--json", "--max-len", "64"])
    lean = json.loads(capsys.readouterr().out)
    main([*args, "--json", "--max-len", "64", "--reference-decode"])
    assert json.loads(capsys.readouterr().out)["tokens"] == lean["tokens"]


def test_generate_errors_are_one_line(model_dir, capsys):
    assert (
        main(["generate", "--model", model_dir, "--prompt", "x", "--max-tokens", "500", "--max-len", "64"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error:") and "context" in err and err.count("\n") == 1
    assert main(["generate", "--model", "/nonexistent", "--prompt", "x"]) == 2
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--top-p", "2"]) == 2
    assert main(["serve", "--model", model_dir, "--port", "70000"]) == 2
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--logprobs", "2"]) == 2  # needs --json
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--device", "cuda:9"]) == 2  # no such GPU
    capsys.readouterr()


def test_serve_on_a_taken_port_is_one_line_before_loading(model_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", "/nonexistent", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1, err


def test_chat_streams_replies_resets_and_exits(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\n/rest\nagain\n/exit\nnever read\n"))
    assert (
        main(["chat", "--model", model_dir, "--max-tokens", "5", "--temperature", "0", "--max-len", "64"])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 2 and "(conversation reset)" in captured.err
    assert "(unknown command /rest" in captured.err  # a typo is not sent to the model


def test_chat_template_renders_roles_with_special_tokens_and_drops_old_thinking():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>\n4"},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]},
    ]
    assert NANOSEEK.render(messages) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|><|user|>and 3+3?<|end|><|assistant|>"
    )
    assert DEEPSEEK.render(messages[1:2]) == "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>"
    tok = tokenizer()
    ids, stop_ids = encode_chat(tok, messages)
    assert ids[0] == tok.bos_id and ids[-1] == tok.token_id("<|assistant|>")
    assert set(stop_ids) == {tok.token_id("<|end|>"), tok.token_id("<|user|>")}
    with pytest.raises(ValueError, match="role"):
        encode_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        encode_chat(tok, [{"role": "user", "content": 3}])


def test_think_splitter_separates_thinking_even_when_tags_are_split_across_chunks():
    text = "<think>let me see: 2+2</think>It is 4."
    for cut in range(len(text) + 1):
        s = ThinkSplitter()
        pieces = s.feed(text[:cut]) + s.feed(text[cut:]) + s.flush()
        assert "".join(t for k, t in pieces if k == "think") == "let me see: 2+2"
        assert "".join(t for k, t in pieces if k == "answer") == "It is 4."
    assert split_think("no thinking here") == ("", "no thinking here")
