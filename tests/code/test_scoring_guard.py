"""The scoring-server guard: deep JSON and a missing Content-Type become 4xx, not 500.

Calls MLflow's real ``invocations`` function (no server, no model: both requests are refused
before the model would be used). The end-to-end check is tests/e2e/test_hostile_requests.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
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


def test_deep_json_is_a_400(guarded):
    with pytest.raises(MlflowException) as info:
        guarded(DEEP, "application/json", NO_MODEL, None)
    assert info.value.get_http_status_code() == 400
    assert "nested too deeply" in info.value.message


def test_missing_content_type_is_a_415(guarded):
    response = guarded(b"{}", None, NO_MODEL, None)
    assert response.status == 415
    assert "Content-Type" in response.response


def test_other_requests_reach_mlflow_unchanged(guarded):
    with pytest.raises(MlflowException) as info:
        guarded(b"[1, 2]", "application/json", NO_MODEL, None)
    assert "Received a list" in info.value.message
    assert guarded(b"{}", "text/plain", NO_MODEL, None).status == 415
