"""Params under ``mlflow run``: the typed values stay, resolved values go beside them."""

from __future__ import annotations

import mlflow

from cars_ml import tracking


def test_a_resolved_value_is_logged_beside_the_typed_one(tracking_uri, monkeypatch):
    # As `mlflow run` leaves it: a run holding the MLproject parameters as typed, its id in the
    # environment for the step to resume.
    with mlflow.start_run() as typed:
        mlflow.log_params({"preset": "auto", "epochs": "5", "budget": "none", "seed": "42"})
    monkeypatch.setenv("MLFLOW_RUN_ID", typed.info.run_id)
    with tracking.start_run(run_name="step"):
        tracking.log_params({"preset": "cpu", "epochs": 5.0, "budget": None, "extra": 1})
        tracking.log_params({"preset": "gpu"})  # the first resolved value stays
    params = mlflow.get_run(typed.info.run_id).data.params
    assert params == {
        "preset": "auto",
        "preset_used": "cpu",
        "epochs": "5",
        "budget": "none",
        "seed": "42",
        "extra": "1",
    }
