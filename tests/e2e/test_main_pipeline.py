"""The main pipeline end to end on tiny settings: child runs, comparison, champion, reuse."""

from __future__ import annotations

import mlflow
import pytest
from e2e_utils import run_entry

pytestmark = pytest.mark.e2e

TINY = ["--models", "mobilenet,vgg16", "--n_trials", "2", "--max_epochs", "1", "--epochs", "1",
        "--fine_tune_epochs", "0", "--image_size", "32", "--weights", "none", "--max_per_class", "8",
        "--max_latency_ms", "none", "--max_size_mb", "none", "--max_int8_f1_drop", "none"]  # fmt: skip


def _pipelines():
    return mlflow.search_runs(filter_string="tags.step = 'pipeline'", search_all_experiments=True,
                              order_by=["attributes.start_time ASC"], output_format="list")  # fmt: skip


def _children(run_id: str):
    return mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                              search_all_experiments=True, output_format="list")  # fmt: skip


def test_pipeline_compares_promotes_and_reuses(sub_env):
    first = run_entry("main", *TINY, env=sub_env, timeout=900)
    assert "champion: version" in first.stdout
    assert "mlflow models serve -m models:/stanford-cars-classifier@champion" in first.stdout

    (parent,) = _pipelines()
    children = _children(parent.info.run_id)
    steps = sorted(c.data.tags.get("step") for c in children)
    # On synthetic data two worker processes tune each backbone's study side by side: one tune
    # run per worker, each holding the one trial it ran, both under the pipeline run.
    assert steps == ["promote", "train", "train", "tune", "tune", "tune", "tune"]
    tunes = [c for c in children if c.data.tags.get("step") == "tune"]
    assert len({t.data.tags["study_name"] for t in tunes}) == 2
    trials = [_children(t.info.run_id) for t in tunes]
    assert [len(t) for t in trials] == [1, 1, 1, 1]
    for study in {t.data.tags["study_name"] for t in tunes}:
        numbers = sorted(trial.data.tags["optuna_trial"] for tune, runs in zip(tunes, trials, strict=True)
                         if tune.data.tags["study_name"] == study for trial in runs)  # fmt: skip
        assert numbers == ["0", "1"], (study, numbers)
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.html", "f1_vs_latency.png"} <= artifacts
    for name in ("mobilenet_test_f1_macro", "vgg16_latency_ms_p50"):
        assert name in parent.data.metrics
    champion = client.get_model_version_by_alias("stanford-cars-classifier", "champion")
    assert champion.current_stage == "Production"

    # Same inputs: every backbone is reused, nothing is trained or registered again.
    second = run_entry("main", *TINY, env=sub_env, timeout=900)
    assert second.stdout.count("reusing run") == 2
    versions = client.search_model_versions("name='stanford-cars-classifier'")
    assert len(versions) == 2
    reused_parent = _pipelines()[1]
    assert sorted(c.data.tags.get("step") for c in _children(reused_parent.info.run_id)) == [
        "promote"
    ]

    # A changed input (the seed) recomputes.
    changed = [TINY[0], "mobilenet", *TINY[2:], "--seed", "7"]
    third = run_entry("main", *changed, env=sub_env, timeout=900)
    assert "reusing run" not in third.stdout
    assert len(client.search_model_versions("name='stanford-cars-classifier'")) == 3
