"""The main pipeline end to end on tiny settings: child runs, comparison, champion, reuse."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from e2e_utils import run_entry, tiny_pipeline_args

pytestmark = pytest.mark.e2e

TINY = [
    *tiny_pipeline_args(),
    "--max_latency_ms",
    "none",
    "--max_size_mb",
    "none",
    "--max_int8_f1_drop",
    "none",
]


def _pipelines():
    return mlflow.search_runs(
        filter_string="tags.step = 'pipeline'",
        search_all_experiments=True,
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def _children(run_id: str):
    return mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        search_all_experiments=True,
        output_format="list",
    )


def test_pipeline_compares_promotes_and_reuses(sub_env, tmp_path):
    first = run_entry("main", *TINY, env=sub_env, timeout=900)
    assert "champion: version" in first.stdout
    assert "mlflow models serve -m models:/stanford-cars-classifier@champion" in first.stdout
    # Library warnings about choices made on purpose (Optuna's experimental heartbeats and
    # plots, Keras' shuffle flag for a dataset that shuffles itself, MLflow's type-hint advice
    # where the signature is explicit) would bury the demo's progress in every worker.
    output = first.stdout + first.stderr
    for noise in ("ExperimentalWarning", "`shuffle=True` was passed", "Add type hints"):
        assert noise not in output, noise

    (parent,) = _pipelines()
    children = _children(parent.info.run_id)
    steps = sorted(c.data.tags.get("step") for c in children)
    # On synthetic data a second process tunes ahead: each backbone's study gets its two
    # trials from one or both processes (one tune run each), all under the pipeline run.
    # After both trains, the better model teaches the other (every backbone passes the switched
    # off budgets): one distillation step.
    assert [s for s in steps if s != "tune"] == ["distill", "promote", "train", "train"]
    (student,) = [c for c in children if c.data.tags.get("step") == "distill"]
    trained = {c.data.tags["backbone"]: c for c in children if c.data.tags.get("step") == "train"}
    # The teacher is chosen on the final validation macro-F1 (ties: the faster, then the older
    # version), as the comparison table shows it (a run's own val_f1_macro is its last epoch's).
    client = mlflow.MlflowClient()
    table = pd.read_csv(
        client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path))
    )
    plain = table[table["teacher"].isna() & table["model_version"].notna()]
    best = plain.sort_values(
        ["val_f1_macro", "latency_ms_p95", "model_version"], ascending=[False, True, True]
    ).iloc[0]
    teacher = trained[best["backbone"]]
    assert student.data.tags["teacher_backbone"] == teacher.data.tags["backbone"]
    assert student.data.tags["backbone"] != teacher.data.tags["backbone"]
    assert student.data.tags["distilled_from"].endswith(f"/{teacher.data.tags['model_version']}")
    # Equal compute, not equal epochs: MobileNet at 32 px costs a tenth of VGG16 per image.
    assert int(trained["mobilenet"].data.params["epochs"]) > int(
        trained["vgg16"].data.params["epochs"]
    )
    tunes = [c for c in children if c.data.tags.get("step") == "tune"]
    studies = {t.data.tags["study_name"] for t in tunes}
    assert len(studies) == 2 and 2 <= len(tunes) <= 4
    for study in studies:
        numbers = sorted(
            trial.data.tags["optuna_trial"]
            for tune in tunes
            if tune.data.tags["study_name"] == study
            for trial in _children(tune.info.run_id)
        )
        assert numbers == ["0", "1"], (study, numbers)
    # The demo's trials train on a stratified half of the training split (auto on synthetic
    # data); the final training sees all of it.
    assert parent.data.params["trial_fraction"] == "0.5"
    trains = [c for c in children if c.data.tags.get("step") == "train"]
    full = {t.data.metrics["num_train_images"] for t in trains}
    assert len(full) == 1
    (full,) = full
    for tune in tunes:
        assert tune.data.params["trial_fraction"] == "0.5"
        assert 10 <= tune.data.metrics["num_train_images"] <= full / 2 + 10, tune.data.metrics
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "comparison.csv",
        "comparison.html",
        "comparison_slices.csv",
        "f1_vs_latency.png",
    } <= artifacts
    # The comparison shows the student beside its teacher.
    assert f"{student.data.tags['backbone']}-from-{teacher.data.tags['backbone']}" in first.stdout
    for name in ("mobilenet_test_f1_macro", "vgg16_latency_ms_p50"):
        assert name in parent.data.metrics
    champion = client.get_model_version_by_alias("stanford-cars-classifier", "champion")
    assert champion.current_stage == "Production"

    # A dry run prints the resolved plan (each backbone's study and step key, and the finished
    # run it would reuse) and starts nothing.
    dry = run_entry("main", *TINY, "--dry_run", "true", env=sub_env, timeout=300)
    assert "dry run: nothing started" in dry.stdout
    for backbone, run in trained.items():
        assert f"{backbone}: study pipeline-{backbone}-" in dry.stdout
        assert run.info.run_id in dry.stdout, dry.stdout
    assert len(_pipelines()) == 1

    # Same inputs: every backbone is reused, nothing is trained or registered again.
    second = run_entry("main", *TINY, env=sub_env, timeout=900)
    assert second.stdout.count("reusing run") == 3  # two backbones and the student
    versions = client.search_model_versions("name='stanford-cars-classifier'")
    assert len(versions) == 3
    reused_parent = _pipelines()[1]
    assert sorted(c.data.tags.get("step") for c in _children(reused_parent.info.run_id)) == [
        "promote"
    ]

    # A changed input (the seed) recomputes.
    changed = [TINY[0], "mobilenet", *TINY[2:], "--seed", "7"]
    third = run_entry("main", *changed, env=sub_env, timeout=900)
    assert "reusing run" not in third.stdout
    # One backbone alone has nobody to teach: a train and no student.
    assert "no distillation: no other backbone passes" in third.stdout
    assert len(client.search_model_versions("name='stanford-cars-classifier'")) == 4
