"""The scoring-server guard: bad requests become short 4xx answers, never a 500 or a stack trace.

Calls MLflow's real ``invocations`` function (no server, no model: every request here is refused
before the model would be used). The end-to-end checks are tests/e2e/test_hostile_requests.py and
tests/e2e/test_serving_memory.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from mlflow.pyfunc import scoring_server

from cars_ml.serving.scoring_guard import harden_scoring_server

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
    """If an MLflow upgrade fixes these, the guard can go (this test then fails)."""
    with pytest.raises(RecursionError):
        scoring_server.invocations(DEEP, "application/json", NO_MODEL, None)
    with pytest.raises(AttributeError):
        scoring_server.invocations(b"{}", None, NO_MODEL, None)


def _message(response) -> str:
    assert "stack_trace" not in response.response
    return json.loads(response.response)["message"]


def test_deep_json_is_a_400(guarded):
    response = guarded(DEEP, "application/json", NO_MODEL, None)
    assert response.status == 400
    assert "nested too deeply" in _message(response)


def test_missing_content_type_is_a_415(guarded):
    response = guarded(b"{}", None, NO_MODEL, None)
    assert response.status == 415
    assert "Content-Type" in response.response


def test_json_is_read_by_the_guard_and_other_types_reach_mlflow(guarded):
    response = guarded(b"[1, 2]", "application/json", NO_MODEL, None)
    assert response.status == 400 and "Received a list" in _message(response)
    assert guarded(b"{}", "text/plain", NO_MODEL, None).status == 415
    # MLflow's own answer to an unknown charset, untouched.
    assert "UTF-8" in guarded(b"{}", "application/json; charset=latin-1", NO_MODEL, None).response
    parquet = guarded(b"PAR1", "application/vnd.apache.parquet", NO_MODEL, None)
    assert parquet.status == 415 and "Parquet" in parquet.response
