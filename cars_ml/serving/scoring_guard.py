"""Bound what one request can cost ``mlflow models serve``, and answer every bad one with a 4xx.

MLflow's scoring server (``mlflow/pyfunc/scoring_server/__init__.py``, a FastAPI app under
uvicorn, verified against MLflow 3.17) has no limits of its own:

- it reads the whole body into memory, however large, before any model code runs;
- it turns ``{"inputs": ...}`` and ``{"instances": ...}`` bodies into numpy string arrays padded
  to the longest entry: one 10 MB image among 63 small ones becomes a 3.6 GB array;
- every request that arrives runs at once, one thread each (as many as the thread pool has);
- its error responses carry the Python stack trace and echo the request back; JSON nested more
  deeply than the recursion limit, or a request without ``Content-Type``, get a 500.

The model is loaded inside the server process before the app is built, so
``CarsClassifier.load_context`` calls :func:`harden_scoring_server` with the model's
:class:`~cars_ml.serving.decode.Limits`. It puts two guards in place:

1. a gate in front of ``/invocations`` (the app class is wrapped once, just before MLflow builds
   the app): a ``Content-Length`` over ``max_request_bytes`` gets a 413 before the body is read,
   a body that grows past it while arriving gets a 413 as soon as it does, and at most
   ``max_concurrent_requests`` requests are read and answered at once (the others wait, then 503);
2. the module's ``invocations`` function (looked up by name on every request) is wrapped: the
   route is decided by the media type alone, every JSON and CSV body is read by ``request.py``
   into plain strings (never a padded array, the items counted before anything is built), and
   every other type (Parquet, which can inflate far beyond its size, included) gets a 415; error
   responses are short and carry no stack trace. MLflow's own parsers are never reached.

Outside the serving process (``mlflow.pyfunc.load_model`` in ``predict``, tests) nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import sys
import threading
from io import StringIO

from cars_ml.serving.decode import Limits, RequestError
from cars_ml.serving.request import EXAMPLE, media_type, parse_body, parse_csv

log = logging.getLogger(__name__)

_MARK = "_cars_ml_guarded"
# Set by `mlflow models serve` for the uvicorn process that builds the scoring app.
SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
# A refused body up to this many times the limit is read and dropped before the 413 (see
# RequestGate); a larger one is answered at once and the connection closed.
DRAIN_FACTOR = 8
# Longest error message returned to a client; the reason comes first and is far shorter.
MAX_MESSAGE_CHARS = 1000
CONTENT_TYPE_MESSAGE = (
    "Missing Content-Type header; send the request with 'Content-Type: application/json'."
)
ACCEPTED_TYPES = ("application/json", "text/csv")
PARQUET_MESSAGE = (
    "Parquet bodies are not accepted by this model (a compressed body can inflate far beyond "
    f"the request limit); send application/json such as {EXAMPLE}, or text/csv."
)


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


def harden_scoring_server(limits: Limits | None = None) -> bool:
    """Install both guards in the serving process; returns whether ``invocations`` is guarded."""
    limits = limits or Limits()
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    serving = bool(os.environ.get(SERVER_MODEL_PATH_ENV))
    if server is None or not hasattr(server, "invocations"):
        if serving:
            raise GuardError("MLflow's scoring server module is not where it was expected")
        return False
    if serving:
        if not _gate_next_app(limits):
            raise GuardError("the request gate could not wrap MLflow's FastAPI app")
        _return_large_buffers()
    guarded = _guard_invocations(server, limits)
    if serving and not guarded:
        raise GuardError("MLflow's scoring function could not be wrapped")
    return guarded


class GuardError(RuntimeError):
    """The request guard cannot be put in place: the server must not start without it."""

    def __init__(self, what: str):
        super().__init__(
            f"Refusing to serve: {what}, so requests would reach MLflow's scoring server "
            "without the request limits. Use the MLflow version this project pins "
            "(pyproject.toml), or train the model again with this release."
        )


def _return_large_buffers() -> None:
    """Make glibc hand every buffer of 1 MiB or more straight back to the system when freed.

    By default glibc raises its mmap threshold after the first large free, so later image-sized
    buffers come from per-thread heaps that fragment and keep their peak: measured under the
    concurrent near-limit load test, the server then grew by a third more than with the
    threshold fixed. Elsewhere than glibc this does nothing.
    """
    import ctypes

    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 2**20)


def _guard_invocations(server, limits: Limits) -> bool:
    original = server.invocations
    response_type = getattr(server, "InvocationsResponse", None)
    if response_type is None:
        return False
    if getattr(original, _MARK, False):
        return True
    import pandas as pd
    from mlflow.exceptions import MlflowException

    def reply(status: int, message: str):
        return response_type(error_body(status, message).decode(), status, "application/json")

    def invocations(data, content_type, model, input_schema):
        work = CURRENT_WORK.get()
        if work is not None and not work.begin():
            return reply(503, "the request ended before it was worked on; retry it.")
        try:
            return scored(data, content_type, model, input_schema)
        finally:
            if work is not None:
                work.end()

    def scored(data, content_type, model, input_schema):
        refusal = _refuse_media_type(content_type)
        if refusal:
            return response_type(response=refusal, status=415, mimetype="text/plain")
        try:
            kind, _ = media_type(content_type)
            parse = parse_body if kind == "application/json" else parse_csv
            values = parse(data, limits)
            # An object column holds the request's own strings: no padded copy.
            frame = pd.DataFrame({"image": pd.Series(values, dtype=object)})
            result = StringIO()
            server.predictions_to_json(model.predict(frame), result)
            return response_type(result.getvalue(), 200, "application/json")
        except RequestError as exc:
            return reply(400, str(exc))
        except RecursionError:
            return reply(400, f"the request is nested too deeply to parse; send {EXAMPLE}.")
        except MlflowException as exc:
            return reply(exc.get_http_status_code(), exc.message)
        except Exception:
            # The stack trace goes to the server's log for the operator, not to the client.
            log.exception("Unexpected error while scoring a request")
            return reply(500, "internal error while scoring; the server log has the details.")

    setattr(invocations, _MARK, True)
    server.invocations = invocations
    log.info("Scoring server hardened: bounded JSON parsing, short 4xx errors, no stack traces.")
    return True


def _refuse_media_type(content_type: str | None) -> str | None:
    """Why a request's ``Content-Type`` is refused (HTTP 415), or ``None`` for JSON and CSV.

    Decided on the media type alone, so no variant of the header (case, spacing, parameters
    repeated or reordered) can send a body to MLflow's own parser, which has no limits.
    """
    if not content_type:
        return CONTENT_TYPE_MESSAGE
    kind, params = media_type(content_type)
    if kind == "application/vnd.apache.parquet":
        return PARQUET_MESSAGE
    if kind not in ACCEPTED_TYPES:
        return (
            f"content type {kind[:80]!r} is not accepted; the accepted content types are "
            f"{', '.join(ACCEPTED_TYPES)}, for example application/json such as {EXAMPLE}."
        )
    if any(value not in ("utf-8", "utf8") for value in params.get("charset", [])):
        return f"{kind} bodies must be UTF-8; send 'Content-Type: {kind}; charset=utf-8'."
    return None


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


def _gate_next_app(limits: Limits) -> bool:
    """Make the next FastAPI app built in this process (MLflow's scoring app) pass the gate.

    ``mlflow.pyfunc.scoring_server.init`` imports ``FastAPI`` when it is called, after the model
    is loaded; the subclass puts the class back as soon as that one app exists.
    """
    try:
        import fastapi
    except ImportError:
        return False
    original = fastapi.FastAPI
    if getattr(original, _MARK, False):
        return True
    gate = RequestGate(limits)

    class GatedFastAPI(original):
        def __init__(self, *args, **kwargs):
            fastapi.FastAPI = original
            super().__init__(*args, **kwargs)

        async def __call__(self, scope, receive, send) -> None:
            await gate(scope, receive, send, super().__call__)

    setattr(GatedFastAPI, _MARK, True)
    fastapi.FastAPI = GatedFastAPI
    return True
