"""The main pipeline end to end on tiny settings, as `mlflow run . -e main`: child runs,
comparison, champion, the MLflow UI a user opens on them, then a dry run, reuse and a changed
input, and every other entry point through `mlflow run` on the champion it promoted.

One real `main` run in the module's store feeds the read-only tests; the tests that add runs
and versions to that store come last (pytest runs a module's tests in file order, and
`--dist loadfile` keeps a module on one worker).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from e2e_utils import ROOT, mlflow_run, run_entry, tiny_pipeline_args
from mlflow_ui import (
    PNG_SIGNATURE,
    check_first_look,
    chromium_page,
    mlflow_ui,
    open_comparison,
    read_comparison,
    require_browser,
    screenshot_comparison,
    ui_metric,
)
from served_model import START_TIMEOUT_S, b64, images_request, post
from servers import free_port, process_group, wait_http

pytestmark = pytest.mark.e2e

BACKBONES = ("mobilenet", "vgg16")
BUDGETS_OFF = ("--max_latency_ms", "none", "--max_size_mb", "none", "--max_int8_f1_drop", "none")
TINY = [*tiny_pipeline_args(",".join(BACKBONES)), *BUDGETS_OFF]
EXPERIMENT = "cars-ml-demo"
UI_METRICS = ("test_f1_macro", "latency_ms_p50")
# With CARS_ML_SAVE_SCREENSHOT=1 the UI test runs its own pipeline with `resnet` added, so the
# picture shows a three-way trade-off, and copies it to docs/mlflow_compare.png (README).
SAVE_SCREENSHOT = os.environ.get("CARS_ML_SAVE_SCREENSHOT") == "1"


@dataclass(frozen=True)
class PipelineRun:
    uri: str
    folder: Path
    stdout: str
    stderr: str
    backbones: tuple[str, ...]


def run_pipeline(folder: Path, cache: Path, backbones: tuple[str, ...], *args) -> PipelineRun:
    """`mlflow run . -e main` as a user runs it from ``folder``, into a SQLite store there.

    Module fixtures start before the per-test cache folder is set: ``cache`` is named here.
    """
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, TF_CPP_MIN_LOG_LEVEL="2")
    env["CARS_ML_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = mlflow_run("main", list(args), env=env, cwd=folder, timeout=900)
    return PipelineRun(uri, folder, proc.stdout, proc.stderr, backbones)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> PipelineRun:
    cache = tmp_path_factory.getbasetemp() / "cars_ml_cache"
    return run_pipeline(tmp_path_factory.mktemp("pipeline"), cache, BACKBONES, *TINY)


def use_store(run: PipelineRun, monkeypatch) -> dict:
    """Point this process at ``run``'s store; returns a child environment that uses it too."""
    monkeypatch.chdir(run.folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(run.uri)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture()
def store(first_run, monkeypatch):
    env = use_store(first_run, monkeypatch)
    yield env
    mlflow.set_tracking_uri(None)


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


def _trained(children) -> dict:
    return {c.data.tags["backbone"]: c for c in children if c.data.tags.get("step") == "train"}


def test_pipeline_tunes_trains_distils_compares_and_promotes(first_run, store, tmp_path):
    assert "champion: version" in first_run.stdout
    assert "mlflow models serve -m models:/stanford-cars-classifier@champion" in first_run.stdout
    # Library warnings about choices made on purpose (Optuna's experimental heartbeats and
    # plots, Keras' shuffle flag for a dataset that shuffles itself, MLflow's type-hint advice
    # where the signature is explicit) would bury the demo's progress in every worker.
    output = first_run.stdout + first_run.stderr
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
    trained = _trained(children)
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
    # data); the final training sees all of it. `mlflow run` logged the value as typed (0:
    # auto); the pipeline logs the one it used beside it.
    assert parent.data.params["trial_fraction"] == "0.0"
    assert parent.data.params["trial_fraction_used"] == "0.5"
    full = {t.data.metrics["num_train_images"] for t in trained.values()}
    assert len(full) == 1
    (full,) = full
    for tune in tunes:
        assert tune.data.params["trial_fraction"] == "0.5"
        assert 10 <= tune.data.metrics["num_train_images"] <= full / 2 + 10, tune.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "comparison.csv",
        "comparison.html",
        "comparison_slices.csv",
        "f1_vs_latency.png",
    } <= artifacts
    # The comparison shows the student beside its teacher.
    assert (
        f"{student.data.tags['backbone']}-from-{teacher.data.tags['backbone']}" in first_run.stdout
    )
    for name in ("mobilenet_test_f1_macro", "vgg16_latency_ms_p50"):
        assert name in parent.data.metrics
    champion = client.get_model_version_by_alias("stanford-cars-classifier", "champion")
    assert champion.current_stage == "Production"


@pytest.fixture()
def ui_run(request, tmp_path_factory, monkeypatch) -> PipelineRun:
    """The module's pipeline, or with CARS_ML_SAVE_SCREENSHOT=1 one with `resnet` added."""
    if SAVE_SCREENSHOT:
        backbones = (*BACKBONES, "resnet")
        args = [*tiny_pipeline_args(",".join(backbones), n_trials=1), *BUDGETS_OFF]
        cache = tmp_path_factory.getbasetemp() / "cars_ml_cache"
        run = run_pipeline(tmp_path_factory.mktemp("screenshot"), cache, backbones, *args)
    else:
        run = request.getfixturevalue("first_run")
    use_store(run, monkeypatch)
    yield run
    mlflow.set_tracking_uri(None)


def test_mlflow_ui_compares_every_backbone(ui_run, tmp_path):
    """In a real headless Chromium: the printed link lands on every backbone's train run, and
    the Compare page shows the run names and metric cells MLflow stored, formatted as the UI
    formats them."""
    sync_api = require_browser()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    stored = {
        r.info.run_name: r
        for r in client.search_runs(
            [experiment.experiment_id], "attributes.run_name LIKE 'train-%'"
        )
    }
    assert set(stored) == {f"train-{b}" for b in ui_run.backbones}
    expected = {
        name: {m: ui_metric(run.data.metrics[m]) for m in UI_METRICS}
        for name, run in stored.items()
    }

    shot = tmp_path / "mlflow_compare.png"
    with (
        mlflow_ui(ui_run.uri, tmp_path) as url,
        chromium_page(sync_api, tmp_path) as page,
    ):
        check_first_look(page, url, experiment.experiment_id, ui_run.stdout, ui_run.backbones)
        open_comparison(page, url, experiment.experiment_id, sorted(stored))
        # Screenshot first: the metric grids are still scrolled to the top and aligned.
        plot_text = screenshot_comparison(page, shot, ui_run.backbones)
        names, metrics = read_comparison(page)

    assert sorted(names) == sorted(expected), names
    for metric in UI_METRICS:
        assert metric in metrics, f"{metric} not in the UI's metric table: {sorted(metrics)}"
        shown = dict(zip(names, metrics[metric], strict=True))
        assert shown == {name: values[metric] for name, values in expected.items()}, metric
    assert all(b in plot_text for b in ui_run.backbones), plot_text
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    if SAVE_SCREENSHOT:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "mlflow_compare.png")


def test_dry_run_prints_the_plan_reruns_reuse_and_a_changed_input_recomputes(first_run, store):
    """Last in the module: it adds runs and versions to the shared store."""
    trained = _trained(_children(_pipelines()[0].info.run_id))
    # A dry run prints the resolved plan (each backbone's study and step key, and the finished
    # run it would reuse) and starts nothing.
    dry = run_entry("main", *TINY, "--dry_run", "true", env=store, timeout=300)
    assert "dry run: nothing started" in dry.stdout
    for backbone, run in trained.items():
        assert f"{backbone}: study pipeline-{backbone}-" in dry.stdout
        assert run.info.run_id in dry.stdout, dry.stdout
    assert len(_pipelines()) == 1

    # Same inputs: every backbone is reused, nothing is trained or registered again.
    second = run_entry("main", *TINY, env=store, timeout=900)
    assert second.stdout.count("reusing run") == 3  # two backbones and the student
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='stanford-cars-classifier'")
    assert len(versions) == 3
    reused_parent = _pipelines()[1]
    assert sorted(c.data.tags.get("step") for c in _children(reused_parent.info.run_id)) == [
        "promote"
    ]

    # A changed input (the seed) recomputes.
    changed = [TINY[0], "mobilenet", *TINY[2:], "--seed", "7"]
    third = run_entry("main", *changed, env=store, timeout=900)
    assert "reusing run" not in third.stdout
    # One backbone alone has nobody to teach: a train and no student.
    assert "no distillation: no other backbone passes" in third.stdout
    assert len(client.search_model_versions("name='stanford-cars-classifier'")) == 4


def test_the_other_entry_points_run_through_mlflow_run(first_run, store, car_photos, tmp_path):
    """One real `mlflow run -e <entry>` path each (the pipeline above is `-e main`): MLflow
    creates the run, renders the generated MLproject command and the entry point resumes it."""
    prepared = mlflow_run("prepare_data", {"data": "synthetic"}, env=store, timeout=300)
    assert "10 classes, 520 images" in prepared.stdout

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tiny = {"model": "mobilenet", "image_size": "32", "weights": "none", "max_per_class": "8"}
    mlflow_run("tune", {**tiny, "n_trials": "2", "max_epochs": "1", "storage": storage},
               env=store, timeout=600)  # fmt: skip
    (tune,) = mlflow.search_runs(
        filter_string=f"tags.step = 'tune' and params.storage = '{storage}'",
        search_all_experiments=True,
        output_format="list",
    )
    assert len(_children(tune.info.run_id)) == 2, "two trials nested under the mlflow run's run"

    dry = mlflow_run("promote", {"dry_run": "true"}, env=store, timeout=300)
    assert "dry run" in dry.stdout.lower(), dry.stdout[-2000:]

    output = tmp_path / "predictions.csv"
    mlflow_run("predict", {"images": str(car_photos[0].parent), "output": str(output)},
               env=store, timeout=300)  # fmt: skip
    frame = pd.read_csv(output, keep_default_na=False)
    assert len(frame) == len(list(car_photos[0].parent.glob("*.jpg")))
    assert (frame["error"] == "").all() and (frame["label"] != "").all()

    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "serve",
               "--env-manager", "local", "-P", f"port={port}"]  # fmt: skip
    with process_group(command, store, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=START_TIMEOUT_S)
        photo = b64(car_photos[0].read_bytes())
        reply = post(port, images_request([photo]))
    assert reply.status == 200, reply.text[:500]
    assert reply.json()["predictions"][0]["label"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0, "0"),
        (0.01818181818, "0.018"),
        (9.608928, "9.609"),
        (16.3362, "16.34"),
        (14719818.0, "14719818"),
        (-0.0441, "-0.044"),
        (272.2008, "272.2"),
        (0.1, "0.1"),
        (0.00012346, "1.235e-4"),
        (1.23456, "1.235"),
    ],
)
def test_ui_metric_matches_the_ui_format(value, shown):
    assert ui_metric(value) == shown
