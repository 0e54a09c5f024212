"""The first look in the MLflow UI: the experiment says it trains models, the printed links
point where the UI routes them, and a student's version names its teacher."""

from __future__ import annotations

import mlflow

from cars_ml import tracking
from cars_ml.tracking.descriptions import model_description, version_description


def test_top_level_runs_mark_the_experiment_as_training_but_keep_an_explicit_kind(tracking_uri):
    mlflow.set_experiment("first-look")
    with tracking.start_run("a"):
        pass
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("first-look")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    other = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    mlflow.set_experiment(experiment_id=other)
    with tracking.start_run("b"):
        pass
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "genai_development"


def test_ui_links_use_the_tracking_server_or_the_default_ui(tracking_uri, monkeypatch):
    links = tracking.ui_links("3", "abc", "stanford-cars-classifier")
    assert links == {
        "run": "http://127.0.0.1:5000/#/experiments/3/runs/abc",
        "children": "http://127.0.0.1:5000/#/experiments/3/runs?searchFilter="
        "tags.mlflow.parentRunId%20%3D%20%27abc%27",
        "model": "http://127.0.0.1:5000/#/models/stanford-cars-classifier",
    }
    mlflow.set_tracking_uri("http://mlflow.internal:5000/")
    assert tracking.ui_base() == "http://mlflow.internal:5000"


def test_a_students_description_names_its_teacher_and_its_budgets():
    row = {"backbone": "mobilenet", "test_f1_macro": 0.9, "eligible": False}
    row["fail_reasons"] = "model_size_mb 60.0 > 50.0"
    tags = {"teacher_backbone": "xception", "distilled_from": "models:/stanford-cars-classifier/2"}
    text = version_description(row, tags, champion=False)
    assert text.startswith(
        "**mobilenet**, distilled from **xception** (models:/stanford-cars-classifier/2)\n"
    )
    assert "| test macro-F1 | 0.9000 |" in text and "| size (MB) | n/a |" in text
    assert "fails the promotion budgets: model_size_mb 60.0 > 50.0." in text
    assert "**Champion:** none yet." in model_description("m", None, "")
