"""Admission for ``POST /invocations`` at the ASGI level, in front of MLflow's scoring app: body
size, read deadlines, the bytes of bodies held at once and the requests worked on at once
(installed by :mod:`cars_ml.serving.scoring_guard`), and the short JSON error bodies both use."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading

from cars_ml.serving.decode import Limits

# A refused body up to this many times the limit is read and dropped before the 413 (see
# RequestGate); a larger one is answered at once and the connection closed.
DRAIN_FACTOR = 8
# Longest error message returned to a client; the reason comes first and is far shorter.
MAX_MESSAGE_CHARS = 1000


def error_body(status: int, message: str) -> bytes:
    """The JSON error body MLflow's scoring server uses, with a bounded message."""
    code = {
        408: "DEADLINE_EXCEEDED",
        413: "REQUEST_LIMIT_EXCEEDED",
        503: "TEMPORARILY_UNAVAILABLE",
    }.get(status)
    code = code or ("INVALID_PARAMETER_VALUE" if status < 500 else "INTERNAL_ERROR")
    return json.dumps({"error_code": code, "message": short_message(message)}).encode()


def short_message(message: str) -> str:
    """Drop MLflow's echo of the request (``Failed to predict data '<the whole request>'``) and
    cap the length, so the reason comes first and a huge request is never sent back."""
    text = str(message)
    if text.startswith("Failed to predict data") and "Error: " in text:
        text = text.split("Error: ", 1)[1]
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + " ... (truncated)"
    return text


class RequestGate:
    """Admission for ``POST /invocations`` (ASGI level): body size, read deadlines, the bytes of
    bodies held at once, and the requests worked on at once.

    The body is read before a slot is taken, within ``body_timeout_s`` in all and
    ``body_idle_timeout_s`` between two pieces (else 408), so clients that trickle their bodies
    hold no slot. Bodies held at once (being read, waiting or worked on) are bounded by
    ``max_buffered_mb`` (else 503). A slot is freed only when the work really ended: MLflow
    answers 504 after its request timeout while the scoring thread goes on, and that thread
    keeps its slot until it returns.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self._slots: asyncio.Semaphore | None = None
        self.buffered = 0  # bytes of the bodies held now

    async def __call__(self, scope, receive, send, app) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            await app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        headers = scope.get("headers", [])
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            # A client that sends the body anyway would lose this reply to the TCP reset that
            # closing on unread data causes, so a moderately oversized body is read and dropped
            # (constant memory) first; a client that asked `Expect: 100-continue` sends nothing.
            if declared <= DRAIN_FACTOR * limit and not _expects_continue(headers):
                await self._drain(receive)
            await _reply(send, 413, _too_large(declared, limit))
            return
        held = [0]  # this request's share of ``buffered``, returned whatever happens
        try:
            body = await self._read(receive, held)
            if isinstance(body, tuple):
                await _reply(send, *body)
                return
            await self._work(scope, _replay(body, receive), send, app)
        finally:
            self.buffered -= held[0]

    async def _read(self, receive, held: list[int]) -> bytes | tuple:
        """The body, or the ``(status, message[, retry])`` that refuses it."""
        limits = self.limits
        try:
            body = await _read_body(
                receive, limits.max_request_bytes, self._hold(held),
                limits.body_timeout_s, limits.body_idle_timeout_s,
            )  # fmt: skip
        except TimeoutError as exc:
            return 408, f"{exc}; send the whole request body promptly."
        except _Full:
            return 503, "the server holds too many request bodies now; retry shortly.", True
        if body is None:
            await self._drain(receive)
            return 413, _too_large(None, limits.max_request_bytes)
        return body

    async def _drain(self, receive) -> None:
        """Drop the rest of a refused body (up to ``DRAIN_FACTOR`` times the limit), within the
        body deadline, so that the client reads the refusal instead of a reset connection."""
        budget = DRAIN_FACTOR * self.limits.max_request_bytes
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_drain(receive, budget), self.limits.body_timeout_s)

    def _hold(self, held: list[int]):
        capacity = self.limits.max_buffered_mb * 2**20

        def hold(nbytes: int) -> None:
            if self.buffered + nbytes > capacity:
                raise _Full
            self.buffered += nbytes
            held[0] += nbytes

        return hold

    async def _work(self, scope, receive, send, app) -> None:
        if self._slots is None:
            # Created here, inside the server's event loop.
            self._slots = asyncio.Semaphore(self.limits.max_concurrent_requests)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.limits.queue_timeout_s)
        except TimeoutError:
            await _reply(send, 503, "the server is busy; retry the request shortly.", retry=True)
            return
        work = Work()
        token = CURRENT_WORK.set(work)
        try:
            await app(scope, receive, send)
        finally:
            CURRENT_WORK.reset(token)
            await work.settled()
            self._slots.release()


class _Full(Exception):
    """The bodies held at once would exceed ``max_buffered_mb``."""


class Work:
    """One admitted request's scoring, as its thread reports it to the gate's event loop.

    ``invocations`` runs in a worker thread that outlives a request MLflow has timed out; the
    gate waits on :meth:`settled` before it frees the slot. A thread that had not started when
    its request ended never starts the work (:meth:`begin` returns ``False``).
    """

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._lock = threading.Lock()
        self._running = False
        self._abandoned = False

    def begin(self) -> bool:
        with self._lock:
            self._running = not self._abandoned
            return self._running

    def end(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self._loop.call_soon_threadsafe(self._done.set)

    async def settled(self) -> None:
        with self._lock:
            if not self._running:
                self._abandoned = True
                return
        await asyncio.shield(self._done.wait())


# The admitted request whose scoring this context runs (copied into the scoring thread).
CURRENT_WORK: contextvars.ContextVar[Work | None] = contextvars.ContextVar(
    "cars_ml_work", default=None
)


def _too_large(size: int | None, limit: int) -> str:
    size_text = f"{size} bytes" if size is not None else "larger"
    return (
        f"request body is {size_text}, over the limit of {limit} bytes (max_request_bytes); "
        "send fewer or smaller images per request."
    )


def _expects_continue(headers) -> bool:
    return any(
        name.lower() == b"expect" and value.lower() == b"100-continue" for name, value in headers
    )


async def _drain(receive, budget: int | None = None) -> None:
    """Read and drop the rest of a refused body, up to ``budget`` bytes."""
    total = 0
    while budget is None or total <= budget:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        total += len(message.get("body", b""))


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(receive, limit: int, hold, total_s: float, idle_s: float) -> bytes | None:
    """The whole body, or ``None`` as soon as more than ``limit`` bytes have arrived.

    ``hold(n)`` accounts for each piece before it is kept; ``TimeoutError`` when the body takes
    longer than ``total_s`` in all or ``idle_s`` between two pieces.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s
    chunks, total = [], 0
    while True:
        remaining = deadline - loop.time()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(min(idle_s, remaining), 0))
        except TimeoutError:
            if remaining <= idle_s:
                raise TimeoutError(
                    f"request body not received within body_timeout_s={total_s:g} s"
                ) from None
            raise TimeoutError(
                f"no part of the request body arrived for body_idle_timeout_s={idle_s:g} s"
            ) from None
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        hold(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands the app the body already read, then the real stream."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send, status: int, message: str, retry: bool = False) -> None:
    body = error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if retry:
        headers.append((b"retry-after", b"1"))
    # The unread body is not drained: uvicorn closes the connection after this response.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
