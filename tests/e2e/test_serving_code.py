"""Versions registered with serving code older than the release's minimum (``serving_code_version``,
absent on versions registered before it existed): ``serve``, ``promote`` and ``rollback`` refuse
them unless ``allow_old_serving_code`` is set, on a real registry and through the entry points."""

from __future__ import annotations

import uuid

import pytest
from e2e_utils import run_entry
from mlflow import MlflowClient
from mlflow.entities import Metric

from cars_ml import MIN_SERVING_CODE_VERSION, SERVING_CODE_TAG, SERVING_CODE_VERSION, tracking
from cars_ml.promotion import registry
from cars_ml.promotion.policy import PromotionConfig
from cars_ml.promotion.run import run_promote

pytestmark = pytest.mark.e2e

MODEL = "stanford-cars-classifier"
METRICS = {"latency_ms_p95": 30.0, "model_size_mb": 17.0, "int8_f1_drop": 0.01}


def register(f1: float, serving_code: int | None) -> str:
    """A version whose run has the edge metrics and ``f1``; ``None``: registered without the
    record, as every version before it existed."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("train") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("train")
    run_id = client.create_run(experiment_id, run_name=uuid.uuid4().hex[:6]).info.run_id
    values = {**METRICS, "test_f1_macro": f1}
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
    client.set_terminated(run_id)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    tags = {} if serving_code is None else {SERVING_CODE_TAG: str(serving_code)}
    version = client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id, tags=tags)
    return str(version.version)


def test_promote_and_rollback_refuse_old_serving_code_unless_allowed(tracking_uri):
    old = register(0.95, None)  # the best by F1, registered before the record existed
    assert MIN_SERVING_CODE_VERSION > 0
    first = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    assert first.action == "none_eligible" and registry.current_champion(MODEL) is None
    row = first.table[first.table["version"] == old].iloc[0]
    assert f"{SERVING_CODE_TAG} 0 < {MIN_SERVING_CODE_VERSION}" in row["fail_reasons"]

    allowed = run_promote(PromotionConfig(allow_old_serving_code=True), MODEL, lock_timeout_s=10)
    assert allowed.new_champion == old  # an explicit override, logged as the promote's param
    client = MlflowClient()
    promotions = client.get_experiment_by_name("stanford-cars-promotion").experiment_id
    runs = client.search_runs([promotions], order_by=["attributes.start_time DESC"])
    assert runs[0].data.params["policy.allow_old_serving_code"] == "True"

    current = register(0.80, SERVING_CODE_VERSION)
    # The old champion cannot stay: a promote without the override moves to a current version.
    moved = run_promote(PromotionConfig(), MODEL, lock_timeout_s=10)
    assert moved.new_champion == current
    assert "fails its budgets" in moved.reason and SERVING_CODE_TAG in moved.reason
    # Nor come back by a rollback.
    with pytest.raises(ValueError, match=f"Rollback to v{old} refused: {SERVING_CODE_TAG} 0"):
        run_promote(PromotionConfig(rollback=True), MODEL, lock_timeout_s=10)
    assert registry.current_champion(MODEL) == current


def test_serve_refuses_a_version_with_old_serving_code(tracking_uri, sub_env, tmp_path):
    old = register(0.9, None)
    current = register(0.8, SERVING_CODE_VERSION)
    refused = run_entry(
        "serve", "--model_uri", f"models:/{MODEL}/{old}", env=sub_env, check=False, cwd=tmp_path
    )
    assert refused.returncode != 0
    assert f"carries serving code 0, older than the minimum {MIN_SERVING_CODE_VERSION}" in (
        refused.stderr
    )
    assert "allow_old_serving_code=true" in refused.stderr
    # The override turns the refusal into a warning; the current version passes as it is.
    tracking.check_serving_code(f"models:/{MODEL}/{old}", allow_old=True)
    tracking.check_serving_code(f"models:/{MODEL}/{current}")
    with pytest.raises(ValueError, match="older than the minimum"):
        tracking.check_serving_code(f"models:/{MODEL}/{old}")
