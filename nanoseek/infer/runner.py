"""Drives one Engine from one background thread, for the asyncio server: bounded admission, cancel, metrics.

The engine is single-threaded, so exactly one thread touches it. Request handlers (on the asyncio event loop)
talk to that thread through a command queue (`submit`, `cancel`); the thread hands each request's output back
through the request's own `asyncio.Queue` with `loop.call_soon_threadsafe`. While there is no work the thread
sleeps on the command queue, so an idle server costs nothing.

Admission is bounded: at most `max_batch` requests decode at once (the cache slots) and at most `max_queue`
wait behind them; one more is refused at once (`Overloaded`, which the server turns into 429 + Retry-After)
instead of growing an unbounded backlog. Every admitted request ends in exactly one of: finished, cancelled
(client gone, timeout) or failed, and its slot is freed in all three cases.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field

from nanoseek.infer.engine import Delta, Engine, EngineError, Request
from nanoseek.infer.sampling import SamplingParams


class Overloaded(Exception):
    """Every slot is busy and the waiting queue is full."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(Exception):
    """The engine thread is not running (shutting down, or it died)."""


@dataclass(eq=False)
class Handle:
    """A request as the server sees it: its output queue, and the engine request once admitted."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Delta | Exception items
    request: Request | None = None
    cancelled: str | None = None  # the outcome it was cancelled with ("cancelled", "timeout")
    submitted: float = field(default_factory=time.monotonic)


class EngineRunner:
    def __init__(self, engine: Engine, max_queue: int = 32):
        self.engine = engine
        self.max_queue = max_queue
        self.capacity = engine.max_batch + max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight: set[Handle] = set()
        self._handles: dict[int, Handle] = {}  # id(engine request) -> handle (engine thread only)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.outcomes: Counter[str] = Counter()  # finished | cancelled | failed | rejected | timeout
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self.last_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> EngineRunner:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- called from the event loop ------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Admit a request or raise Overloaded / Unavailable. Thread-safe."""
        if not self.alive:
            raise Unavailable("the engine is not running")
        handle = Handle(prompt, params, asyncio.get_running_loop())
        with self._lock:
            if len(self._in_flight) >= self.capacity:
                self.outcomes["rejected"] += 1
                raise Overloaded(
                    f"server busy: {self.engine.max_batch} requests running and {self.max_queue} waiting"
                )
            self._in_flight.add(handle)
        self._commands.put(("add", handle))
        return handle

    def cancel(self, handle: Handle, outcome: str = "cancelled") -> None:
        """Stop a request (client gone, timeout); its slot is freed by the engine thread. Idempotent."""
        with self._lock:
            if handle not in self._in_flight or handle.cancelled:
                return
            handle.cancelled = outcome
        self._commands.put(("cancel", handle))

    # ---- metrics -------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queue_depth(self) -> int:
        """Admitted requests without a cache slot yet."""
        return max(0, len(self._in_flight) - len(self.engine.running))

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            try:
                block = not self.engine.has_work()
                self._drain(block)
                if self.engine.has_work():
                    before = self.engine.stats.generated_tokens
                    deltas = self.engine.step()
                    self._record(self.engine.stats.generated_tokens - before)
                    for d in deltas:
                        self._deliver(d)
            except Exception as e:  # a bug: fail every request rather than hang them, and keep serving
                self.last_error = "".join(traceback.format_exception_only(type(e), e)).strip()
                traceback.print_exc()
                self._fail_all(RuntimeError(f"internal engine error: {self.last_error}"))
        self._fail_all(Unavailable("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            handle: Handle = arg
            if handle.cancelled:
                return self._close(handle, handle.cancelled)
            try:
                handle.request = self.engine.add(handle.prompt, handle.params)
            except (EngineError, ValueError) as e:  # the server validates first; this is a safety net
                return self._close(handle, "failed", e)
            self._handles[id(handle.request)] = handle
        elif kind == "cancel":
            handle = arg
            if handle.request is not None:
                self.engine.cancel(handle.request)
                self._handles.pop(id(handle.request), None)
            self._close(handle, handle.cancelled)

    def _deliver(self, d: Delta) -> None:
        handle = self._handles.get(id(d.request))
        if handle is None:
            return
        if d.finished:  # bookkeeping first: whoever reads the last delta sees the request counted
            self._handles.pop(id(d.request), None)
            with self._lock:
                self.outcomes["finished"] += 1
                self._in_flight.discard(handle)
        _post(handle, d)

    def _close(self, handle: Handle, outcome: str, error: Exception | None = None) -> None:
        with self._lock:
            if handle not in self._in_flight:
                return
            self.outcomes[outcome] += 1
            self._in_flight.discard(handle)
        if error is not None:
            _post(handle, error)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            handles = list(self._in_flight)
        for handle in handles:
            if handle.request is not None and not handle.request.finished:
                self.engine.cancel(handle.request)
            self._close(handle, "failed", error)
        self._handles.clear()

    def _record(self, tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.popleft()


def _post(handle: Handle, item) -> None:
    """Hand an item to the handle's event loop; a closed loop (server gone) has nobody left to tell."""
    try:
        handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
    except RuntimeError:
        pass
