"""The OpenAI-compatible server (nanoseek/infer/server.py + runner.py), run for real: uvicorn on 127.0.0.1 with
an ephemeral port, driven by the official `openai` client and by raw HTTP. Every wait is bounded."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager

import openai
import pytest
from infer_models import one_thread, random_model, tokenizer  # noqa: F401

from nanoseek.infer import Engine
from nanoseek.infer.runner import EngineRunner
from nanoseek.infer.server import BackgroundServer, create_app

MODEL = "tiny"
USER = [{"role": "user", "content": "To be, or not"}]


@contextmanager
def running_server(max_batch=2, max_queue=1, max_len=64, api_key=None, request_timeout=30.0, gate=None):
    """A real server. With `gate` (a threading.Event), every engine step first waits for it: requests then
    pile up deterministically, which is how the limit tests fill the queue."""
    engine = Engine(random_model(), tokenizer(), max_batch=max_batch, max_len=max_len)
    if gate is not None:
        step = engine.step

        def gated_step():
            assert gate.wait(30), "test gate never opened"
            return step()

        engine.step = gated_step
    runner = EngineRunner(engine, max_queue=max_queue).start()
    app = create_app(runner, tokenizer(), MODEL, api_key=api_key, request_timeout=request_timeout)
    try:
        with BackgroundServer(app) as server:
            server.runner, server.engine = runner, engine
            yield server
    finally:
        if gate is not None:
            gate.set()
        runner.stop()


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def request(server, method, path, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) over plain http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return resp.status, dict(resp.getheaders()), text


def sse_events(server, path, body) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    text = resp.read().decode()
    conn.close()
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


def client(server, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=30)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- the openai client, unchanged ----------------------------------------------------------------------
def test_openai_client_lists_the_model_and_completes(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == [MODEL]
    r = c.completions.create(model=MODEL, prompt="To be", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens == len(tokenizer().encode("To be", bos=True))  # text prompts start with BOS
    chunks = list(c.completions.create(model=MODEL, prompt="To be", max_tokens=5, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_streaming_and_not(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, seed=1)
    message = r.choices[0].message
    assert message.role == "assistant" and r.usage.completion_tokens == 6
    stream = c.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_logprobs_and_seeded_sampling(server):
    c = client(server)
    args = dict(model=MODEL, messages=USER, max_tokens=5, temperature=1.0, seed=7)
    a = c.chat.completions.create(**args, logprobs=True, top_logprobs=2)
    b = c.chat.completions.create(**args)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same text
    content = a.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_stream_is_server_sent_events_ending_in_done(server):
    events = sse_events(
        server, "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}
    )
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_reply(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="To be", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:12]
    r = c.completions.create(model=MODEL, prompt="To be", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


# ---- errors: OpenAI bodies, 4xx, never a 500 -----------------------------------------------------------
@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": list(range(1, 80))}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            400,
            None,
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": USER, "stop": 3}, 400, None),
    ],
)
def test_bad_requests_get_an_openai_error_body(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    code, _, reply = request(server, "POST", path, None if raw else body, raw=raw)
    assert code == status
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    if param:
        assert reply["error"]["param"].startswith(param)


@pytest.mark.parametrize("prompt", [123, ["a", "b"], [1, "b"]])
def test_a_prompt_of_the_wrong_type_names_the_field_not_pydantics_union_member(server, prompt):
    status, _, reply = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": prompt})
    assert status == 400 and reply["error"]["param"] == "prompt", reply
    assert (
        reply["error"]["message"]
        == "prompt: must be a string or a list of token ids (one prompt per request)"
    )


def test_unknown_routes_and_methods_get_error_bodies(server):
    assert request(server, "GET", "/v1/nothing")[0] == 404
    code, _, reply = request(server, "GET", "/v1/chat/completions")
    assert code == 405 and "error" in reply
    code, _, reply = request(server, "GET", "/v1/models/gpt-4")
    assert code == 404 and reply["error"]["code"] == "model_not_found"


def test_the_openai_client_sees_errors_as_exceptions(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model=MODEL, prompt="x", max_tokens=500)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4", messages=USER)


# ---- limits --------------------------------------------------------------------------------------------
def test_a_full_queue_is_refused_with_429_and_retry_after():
    gate = threading.Event()
    with running_server(max_batch=1, max_queue=1, gate=gate) as s:
        results = []

        def call():
            results.append(
                request(s, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
            )

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: s.runner.in_flight == 2)
        code, headers, reply = request(s, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert code == 429 and headers["retry-after"] == "1" and reply["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(s).completions.create(model=MODEL, prompt="x", max_tokens=2)
        gate.set()
        for t in threads:
            t.join(30)
        assert [r[0] for r in results] == [200, 200]  # the admitted ones complete
        assert s.runner.outcomes["rejected"] == 2 and s.runner.outcomes["finished"] == 2


def test_a_request_past_its_timeout_gets_504_and_frees_its_slot():
    gate = threading.Event()
    with running_server(request_timeout=0.5, gate=gate) as s:
        code, _, reply = request(
            s, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3}
        )
        assert code == 504 and reply["error"]["code"] == "timeout"
        events = sse_events(s, "/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True})
        assert json.loads(events[-2][6:])["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
        gate.set()
        wait_until(lambda: s.runner.in_flight == 0 and not s.engine.has_work())
        assert s.engine.free_slots == 2 and s.runner.outcomes["timeout"] == 2


def test_a_client_disconnect_cancels_the_generation_and_frees_the_cache():
    gate = threading.Event()
    with running_server(max_len=128, gate=gate) as s:
        # streaming: read the first event, then hang up
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = {"model": MODEL, "messages": USER, "stream": True, "max_tokens": 100}
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # the role chunk
        gate.set()
        wait_until(lambda: s.engine.running)  # it holds a slot and decodes ...
        gate.clear()  # (pause the engine, so that it cannot finish before the server notices)
        conn.close()  # ... until the client goes away
        wait_until(lambda: all(h.cancelled for h in s.runner._in_flight))
        gate.set()
        wait_until(lambda: s.runner.outcomes["cancelled"] == 1 and not s.engine.running)
        assert s.engine.free_slots == 2 and s.engine.cache_tokens_in_use == 0
        # non-streaming: send the request and hang up without reading
        gate.clear()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        data = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 100}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        wait_until(lambda: s.runner.in_flight == 1)
        sock.close()
        wait_until(lambda: all(h.cancelled for h in s.runner._in_flight))  # the server noticed
        gate.set()
        wait_until(lambda: s.runner.outcomes["cancelled"] == 2)
        wait_until(lambda: not s.engine.has_work())
        assert s.engine.free_slots == 2 and s.runner.outcomes["finished"] == 0


def test_api_key_is_checked_on_the_api_only():
    with running_server(api_key="sesame") as s:
        assert request(s, "GET", "/v1/models")[0] == 401
        assert request(s, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(s, "GET", "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        assert client(s, "sesame").completions.create(model=MODEL, prompt="x", max_tokens=2).usage
        assert request(s, "GET", "/health")[0] == 200 and request(s, "GET", "/")[0] == 200


def test_health_and_prometheus_metrics(server):
    code, _, body = request(server, "GET", "/health")
    assert code == 200 and body["status"] == "ok"
    client(server).completions.create(model=MODEL, prompt="x", max_tokens=3)
    code, headers, text = request(server, "GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for line in text.strip().splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    for name in (
        "nanoseek_generation_tokens_per_second",
        "nanoseek_queue_depth",
        "nanoseek_cache_slots_used",
        "nanoseek_cache_bytes_used",
        "nanoseek_spec_acceptance_rate",
    ):
        assert name in values
    assert values['nanoseek_requests_total{outcome="finished"}'] >= 1
    assert values["nanoseek_generation_tokens_total"] >= 3
    assert values["nanoseek_cache_bytes_per_token"] == server.engine.bytes_per_token


# ---- the chat page in a real browser -------------------------------------------------------------------
def _chromium() -> str | None:
    for path in (os.environ.get("NANOSEEK_CHROMIUM"), "/usr/lib/chromium/chromium"):
        if path and os.path.exists(path):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_chat_page_streams_a_reply_in_headless_chromium(server):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; or set NANOSEEK_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extras)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=flags, timeout=60_000
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/", timeout=30_000)
            page.fill("#max-tokens", "12")
            page.fill("#input", "To be, or not to be")
            page.click("#send")
            reply = page.locator(".msg.assistant").first
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
            assert page.locator(".msg.user").first.inner_text() == "To be, or not to be"
            assert reply.get_attribute("class") == "msg assistant"  # not an error box
            assert int(reply.get_attribute("data-chunks")) >= 2  # it arrived in pieces
            assert reply.inner_text().strip()
        finally:
            browser.close()
