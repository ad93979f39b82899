"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), with a chat page at `/`.

    nanoseek serve --model runs/speedrun [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the
chat page, one static file). The official `openai` client works against it unchanged.

Behaviour at the edges, each of which a client can rely on:
- Every error is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with a 4xx status:
  malformed JSON, wrong types, out-of-range settings, a prompt longer than the context (400), a wrong API key
  (401), an unknown model or route (404), a full queue (429 + Retry-After), an engine that is not running (503 +
  Retry-After), a request that ran past `--request-timeout` (504; in a stream: an error event, then [DONE]).
- A client that disconnects cancels its generation: its cache slot is free for the next step.
- One engine thread does all the model work (nanoseek/infer/runner.py); handlers only wait on queues.
- Binds to 127.0.0.1 unless told otherwise; `--api-key` turns on a Bearer check for /v1/*.
- A text prompt to /v1/completions starts with BOS, as every pretraining document and `nanoseek generate` do
  (so both give the same tokens for the same prompt); a prompt of token ids is used as given.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.chat import ChatTemplateError, encode_chat
from nanoseek.infer.engine import Delta
from nanoseek.infer.runner import EngineRunner, Handle, Overloaded, Unavailable
from nanoseek.infer.sampling import SamplingError, SamplingParams

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


# ---- request bodies ----------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "0.5" is not a temperature and 1.0 is not a token count; unknown fields are ignored, like OpenAI's
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # not in OpenAI's API; vLLM's extension
    repetition_penalty: float = 1.0  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers: dict[str, str] = {}


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(
    runner: EngineRunner,
    tokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    request_timeout: float = 600.0,
) -> FastAPI:
    engine = runner.engine
    created = int(time.time())
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(_validation_api_error(e.errors()))

    def check_key(request: Request) -> None:
        # A dependency, not an HTTP middleware: starlette's BaseHTTPMiddleware wraps `receive`, which hides a
        # client's disconnect from the handler.
        if api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "invalid API key", code="invalid_api_key")

    api = [Depends(check_key)]

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if not runner.alive:
            return JSONResponse({"status": "unavailable", "error": runner.last_error}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus_text(runner), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}

    @app.get("/v1/models", dependencies=api)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=api)
    async def model(name: str):
        if name != model_name:
            raise _unknown_model(name)
        return model_card()

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        if isinstance(body.prompt, list):  # token ids: used as given
            prompt = body.prompt
        else:  # text starts with BOS, as every pretraining document does (and as `nanoseek generate` does)
            prompt = tokenizer.encode(body.prompt)
            if prompt and tokenizer.bos_id is not None and prompt[0] != tokenizer.bos_id:  # "" stays a 400
                prompt = [tokenizer.bos_id, *prompt]
        vocab = engine.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        params = _params(body, prompt, body.max_tokens, default_max=16, logprobs=body.logprobs)
        return await _respond(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request):
        body = await _parse(request, ChatBody)
        try:
            prompt, stop_ids = encode_chat(tokenizer, [m.model_dump() for m in body.messages])
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, prompt, max_tokens, default_max=None, logprobs=top, stop_ids=stop_ids)
        return await _respond(request, body, prompt, params, chat=True)

    async def _parse(request: Request, kind: type[_Body]) -> _Body:
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = kind.model_validate(data)
        except ValidationError as e:
            raise _validation_api_error(e.errors()) from None
        if body.model != model_name:
            raise _unknown_model(body.model)
        if body.n != 1:
            raise APIError(400, "n: only n = 1 is supported", param="n")
        return body

    def _params(body, prompt, max_tokens, default_max, logprobs, stop_ids=()) -> SamplingParams:
        room = engine.max_len - len(prompt)
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context is {engine.max_len} tokens",
                param="messages" if stop_ids else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        if max_tokens < 1 or max_tokens > room:
            raise APIError(
                400,
                f"max_tokens: must be in [1, {room}] for a prompt of {len(prompt)} tokens (context "
                f"{engine.max_len})",
                param="max_tokens",
                code="context_length_exceeded" if max_tokens > room else None,
            )
        if not 0 <= body.temperature <= 2:
            raise APIError(400, "temperature: must be in [0, 2]", param="temperature")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop strings", param="stop")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                seed=body.seed,
                stop=stop,
                stop_token_ids=stop_ids,
                logprobs=logprobs,
            ).validate()
        except SamplingError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None

    async def _respond(request: Request, body: _Body, prompt: list[int], params: SamplingParams, chat: bool):
        try:
            handle = runner.submit(prompt, params)
        except Overloaded as e:
            err = APIError(429, str(e), type="rate_limit_error", code="server_busy")
            err.headers["Retry-After"] = str(e.retry_after)
            raise err from None
        except Unavailable as e:
            err = APIError(503, str(e), type="server_error", code="unavailable")
            err.headers["Retry-After"] = "5"
            raise err from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        fmt = _Formatter(rid, model_name, tokenizer, chat, len(prompt))
        deadline = time.monotonic() + request_timeout
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            events = _stream(request, handle, fmt, deadline, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        deltas = []
        try:
            while True:
                item = await _next(request, handle, deadline)
                if isinstance(item, Exception):
                    raise _engine_error(item)
                deltas.append(item)
                if item.finished:
                    return fmt.full(deltas)
        finally:
            runner.cancel(handle)  # a no-op once finished; frees the slot on timeout / disconnect / error

    async def _next(request: Request, handle: Handle, deadline: float):
        """The handle's next item; raises on timeout and cancels the request if the client went away."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                runner.cancel(handle, "timeout")
                raise APIError(
                    504, f"request timed out after {request_timeout:g} s", "timeout", code="timeout"
                )
            try:
                return await asyncio.wait_for(handle.queue.get(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    runner.cancel(handle)
                    raise APIError(499, "the client closed the request", code="client_closed") from None

    async def _stream(request, handle, fmt, deadline, include_usage) -> AsyncIterator[str]:
        try:
            if fmt.chat:
                yield _sse(fmt.chunk("", None, role=True))
            while True:
                try:
                    item = await _next(request, handle, deadline)
                except APIError as e:
                    yield _sse(
                        {"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}}
                    )
                    break
                if isinstance(item, Exception):
                    e = _engine_error(item)
                    yield _sse(
                        {"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}}
                    )
                    break
                reason = _finish_reason(item.request) if item.finished else None
                if item.text or reason or item.logprobs and fmt.wants_logprobs(item):
                    yield _sse(fmt.chunk(item.text, reason, delta=item))
                if item.finished:
                    if include_usage:
                        yield _sse(fmt.usage_chunk(item.request))
                    break
            yield "data: [DONE]\n\n"
        finally:
            runner.cancel(handle)  # client disconnect (the generator is closed) or any error: free the slot

    return app


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")


_UNION_HINTS = {"prompt": "must be a string or a list of token ids (one prompt per request)"}


def _validation_api_error(errors: list) -> APIError:
    first = errors[0] if errors else {}
    parts = [str(x) for x in first.get("loc", ()) if x != "body"]
    # pydantic names the member of a union it tried ("prompt.str", "prompt.list[int].0"): not a field a client
    # sent, so the error names the field and says what it accepts
    tag = next((i for i, x in enumerate(parts) if x in ("str", "int") or "[" in x), None)
    if tag is not None:
        field = ".".join(parts[:tag])
        return APIError(400, f"{field}: {_UNION_HINTS.get(field, 'has the wrong type')}", param=field or None)
    loc = ".".join(parts)
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, Unavailable):
        return APIError(503, str(e), "server_error", code="unavailable")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, str(e), "server_error")


def _finish_reason(req) -> str:
    return "stop" if req.finish_reason == "stop" else "length"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Formatter:
    """OpenAI response bodies for one request: full responses, stream chunks, usage, logprobs."""

    def __init__(self, rid: str, model: str, tokenizer, chat: bool, prompt_tokens: int):
        self.rid, self.model, self.tok, self.chat = rid, model, tokenizer, chat
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def usage(self, req) -> dict:
        n = req.num_generated
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }

    def wants_logprobs(self, d: Delta) -> bool:
        return d.request.params.logprobs is not None

    def logprobs(self, lps: list, text_offset: int = 0) -> dict | None:
        if not lps or lps[0] is None:
            return {"content": []} if self.chat and lps else None
        piece = lambda t: self.tok.decode([t])  # noqa: E731
        if self.chat:

            def entry(t, lp):
                return {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}

            return {
                "content": [
                    {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                    for lp in lps
                ]
            }
        tokens = [piece(lp.token) for lp in lps]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{piece(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def full(self, deltas: list[Delta]) -> dict:
        req = deltas[-1].request
        lps = [lp for d in deltas for lp in d.logprobs] if req.params.logprobs is not None else []
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": _finish_reason(req),
            "logprobs": self.logprobs(lps),
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": req.text}
        else:
            choice["text"] = req.text
        return {**self._base(self.object), "choices": [choice], "usage": self.usage(req)}

    def chunk(
        self, text: str, finish_reason: str | None, role: bool = False, delta: Delta | None = None
    ) -> dict:
        lps = self.logprobs(delta.logprobs) if delta is not None and self.wants_logprobs(delta) else None
        if self.chat:
            body = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": body, "logprobs": lps, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, req) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": self.usage(req)}


# ---- metrics -----------------------------------------------------------------------------------------------
def prometheus_text(runner: EngineRunner) -> str:
    """The Prometheus text exposition format (version 0.0.4), written by hand: no client library needed."""
    e, s = runner.engine, runner.engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP nanoseek_{name} {help}")
        lines.append(f"# TYPE nanoseek_{name} {kind}")
        lines.extend(f"nanoseek_{name}{labels} {value:g}" for labels, value in samples)

    outcomes = ("finished", "cancelled", "timeout", "failed", "rejected")
    metric(
        "requests_total",
        "counter",
        "Requests by outcome (rejected = refused with 429).",
        [(f'{{outcome="{o}"}}', runner.outcomes[o]) for o in outcomes],
    )
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
           [("", runner.tokens_per_second())])  # fmt: skip
    metric("running_requests", "gauge", "Requests holding a cache slot.", [("", len(e.running))])
    metric("queue_depth", "gauge", "Admitted requests waiting for a cache slot.", [("", runner.queue_depth)])
    metric("queue_capacity", "gauge", "Requests admitted at most (slots + queue).", [("", runner.capacity)])
    metric("cache_slots_total", "gauge", "Cache slots (max batch).", [("", e.max_batch)])
    metric("cache_slots_used", "gauge", "Cache slots in use.", [("", len(e.running))])
    metric("cache_bytes_total", "gauge", "Bytes preallocated for the KV cache.", [("", e.cache_bytes)])
    metric("cache_bytes_per_token", "gauge", "Cache bytes per token (all layers).", [("", e.bytes_per_token)])
    metric("cache_tokens_used", "gauge", "Tokens held in the cache.", [("", e.cache_tokens_in_use)])
    metric("cache_bytes_used", "gauge", "Bytes of the cache holding tokens.",
           [("", e.cache_tokens_in_use * e.bytes_per_token)])  # fmt: skip
    metric("spec_draft_tokens_total", "counter", "MTP draft tokens proposed.", [("", s.draft_tokens)])
    metric("spec_accepted_tokens_total", "counter", "MTP draft tokens accepted.", [("", s.accepted_tokens)])
    metric("spec_acceptance_rate", "gauge", "Accepted / proposed MTP drafts.", [("", s.acceptance_rate)])
    return "\n".join(lines) + "\n"


# ---- running it --------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn in a thread on an already-bound socket (port 0 = an ephemeral port): for tests and benchmarks."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 32,
    max_len: int | None = None,
    speculative: bool = False,
    lean: bool = True,
    request_timeout: float = 600.0,
    device: str = "cpu",
) -> None:
    """Load a model and serve it until interrupted."""
    import uvicorn

    from nanoseek.infer.engine import Engine, load

    model, tokenizer = load(model_path, device=device)
    engine = Engine(
        model, tokenizer, max_batch=max_batch, max_len=max_len, speculative=speculative, lean=lean
    )
    runner = EngineRunner(engine, max_queue=max_queue).start()
    name = model_name or Path(model_path).resolve().name
    app = create_app(runner, tokenizer, name, api_key=api_key, request_timeout=request_timeout)
    print(f"nanoseek: serving {name!r} on http://{host}:{port} (chat page at /, OpenAI API at /v1)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        runner.stop()
