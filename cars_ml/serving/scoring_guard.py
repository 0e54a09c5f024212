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

1. the gate of ``gate.py`` in front of ``/invocations`` (the app class is wrapped once, just
   before MLflow builds the app): body size, read deadlines, the bytes of bodies held at once
   and at most ``max_concurrent_requests`` requests worked on at once;
2. the module's ``invocations`` function (looked up by name on every request) is wrapped: the
   route is decided by the media type alone, every JSON and CSV body is read by ``request.py``
   into plain strings (never a padded array, the items counted before anything is built), and
   every other type (Parquet, which can inflate far beyond its size, included) gets a 415; error
   responses are short and carry no stack trace. MLflow's own parsers are never reached.

Outside the serving process (``mlflow.pyfunc.load_model`` in ``predict``, tests) nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from io import StringIO

from cars_ml.serving.decode import Limits, RequestError
from cars_ml.serving.gate import CURRENT_WORK, RequestGate, error_body
from cars_ml.serving.request import EXAMPLE, media_type, parse_body, parse_csv

log = logging.getLogger(__name__)

_MARK = "_cars_ml_guarded"
# Set by `mlflow models serve` for the uvicorn process that builds the scoring app.
SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
CONTENT_TYPE_MESSAGE = (
    "Missing Content-Type header; send the request with 'Content-Type: application/json'."
)
ACCEPTED_TYPES = ("application/json", "text/csv")
PARQUET_MESSAGE = (
    "Parquet bodies are not accepted by this model (a compressed body can inflate far beyond "
    f"the request limit); send application/json such as {EXAMPLE}, or text/csv."
)


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
    buffers come from per-thread heaps that fragment and keep their peak, and a server under
    concurrent near-limit load grows well past its bound (docs/serving.md). Elsewhere than
    glibc this does nothing.
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
    invocations.__wrapped__ = original  # inspect.unwrap finds MLflow's own function
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
