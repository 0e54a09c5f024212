"""The scoring-server guard: bad requests become short 4xx answers, never a 500 or a stack trace.

Calls MLflow's real ``invocations`` function (no server, no model: every request here is refused
before the model would be used). The end-to-end checks are tests/e2e/test_hostile_requests.py and
tests/e2e/test_serving_memory.py.
"""

from __future__ import annotations

import inspect
import json
import sys
from types import SimpleNamespace

import pytest
from mlflow.pyfunc import scoring_server

from cars_ml.serving.scoring_guard import (
    SERVER_MODEL_PATH_ENV,
    GuardError,
    harden_scoring_server,
)

DEEP = b"[" * 50_000 + b"]" * 50_000
# Both requests are refused before MLflow looks at more than the model's (absent) metadata.
NO_MODEL = SimpleNamespace(metadata=None)


@pytest.fixture()
def guarded(monkeypatch):
    monkeypatch.setattr(scoring_server, "invocations", scoring_server.invocations)
    assert harden_scoring_server()
    assert harden_scoring_server()  # idempotent: a second model load does not wrap twice
    return scoring_server.invocations


def test_unguarded_mlflow_raises_what_becomes_a_500():
    """If an MLflow upgrade fixes these, the guard can go (this test then fails).

    MLflow's own function, even where an earlier test in this process loaded a served model
    (which guards it for the rest of the process)."""
    unguarded = inspect.unwrap(scoring_server.invocations)
    with pytest.raises(RecursionError):
        unguarded(DEEP, "application/json", NO_MODEL, None)
    with pytest.raises(AttributeError):
        unguarded(b"{}", None, NO_MODEL, None)


def _message(response) -> str:
    assert "stack_trace" not in response.response
    return json.loads(response.response)["message"]


def test_deep_json_is_a_400(guarded):
    response = guarded(DEEP, "application/json", NO_MODEL, None)
    assert response.status == 400
    assert "too many JSON items" in _message(response)


def test_missing_content_type_is_a_415(guarded):
    response = guarded(b"{}", None, NO_MODEL, None)
    assert response.status == 415
    assert "Content-Type" in response.response


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "APPLICATION/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8;charset=utf-8",
        "application/json; format=pandas-records; charset=utf-8",
        'application/json ; charset="utf-8"',
    ],
)
def test_every_json_variant_is_read_by_the_guard(guarded, content_type):
    """No header variant reaches MLflow's parser, which pads strings with no count check."""
    response = guarded(b"[1, 2]", content_type, NO_MODEL, None)
    assert response.status == 400 and "Received a list" in _message(response)
    tiny = b'{"inputs": [' + b",".join([b'""'] * 100_000) + b"]}"
    response = guarded(tiny, content_type, NO_MODEL, None)
    assert response.status == 400 and "too many JSON items" in _message(response)


def test_csv_is_read_by_the_guard(guarded):
    response = guarded(b"image\n" + b"QUJD\n" * 1000, "Text/CSV; header=present", NO_MODEL, None)
    assert response.status == 400
    assert "too many images in one request: 1000 > " in _message(response)


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("text/plain", "'text/plain' is not accepted"),
        ("application/x-www-form-urlencoded", "is not accepted"),
        ("application/jsonx", "is not accepted"),
        ("multipart/form-data; boundary=x", "is not accepted"),
        ("application/vnd.apache.parquet", "Parquet"),
        ("APPLICATION/VND.APACHE.PARQUET; x=1", "Parquet"),
        ("application/json; charset=latin-1", "UTF-8"),
        ("application/json; charset=utf-8; charset=utf-16", "UTF-8"),
        ("text/csv; charset=iso-8859-1", "UTF-8"),
        ("", "Content-Type"),
    ],
)
def test_other_types_and_charsets_get_a_415(guarded, content_type, message):
    response = guarded(b"{}", content_type, NO_MODEL, None)
    assert response.status == 415
    assert message in response.response


def test_a_server_that_cannot_install_the_guard_does_not_start(monkeypatch):
    """In the serving process a guard that cannot be put in place is fatal, not skipped."""
    monkeypatch.setattr(scoring_server, "invocations", scoring_server.invocations)
    monkeypatch.setenv(SERVER_MODEL_PATH_ENV, "/models/m")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now fails
    with pytest.raises(GuardError, match="Refusing to serve: the request gate could not wrap"):
        harden_scoring_server()
    monkeypatch.delitem(sys.modules, "mlflow.pyfunc.scoring_server")
    with pytest.raises(GuardError, match="scoring server module"):
        harden_scoring_server()
    monkeypatch.delenv(SERVER_MODEL_PATH_ENV)
    assert harden_scoring_server() is False  # outside a server (predict, tests): nothing to do
