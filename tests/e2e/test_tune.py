"""Tuning end to end on tiny synthetic data: nested runs, pruning, resume, shared PostgreSQL
storage, multi-objective, params_from, bad parameters."""

from __future__ import annotations

import subprocess
import sys

import keras
import mlflow
import optuna
import pytest
from e2e_utils import ROOT, run_entry

from cars_ml.data import DataConfig
from cars_ml.modeling import backbones
from cars_ml.training.fit import HParams
from cars_ml.tuning import search_space
from cars_ml.tuning.run import TuneConfig, run_tune
from cars_ml.tuning.storage import best_params

pytestmark = pytest.mark.e2e
TINY = DataConfig(max_classes=4, max_per_class=12)


def _cfg(tmp_path, **kw) -> TuneConfig:
    base = dict(
        model="mobilenet",
        data=TINY,
        n_trials=3,
        image_size=32,
        weights="none",
        max_epochs=1,
        pruner="none",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    return TuneConfig(**{**base, **kw})


def _children(parent_id: str):
    return mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        search_all_experiments=True,
        output_format="list",
    )


def _parent_of(study_name: str):
    runs = mlflow.search_runs(
        filter_string=f"tags.study_name = '{study_name}' and tags.step = 'tune'",
        search_all_experiments=True,
        output_format="list",
    )
    return runs


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory) -> str:
    """A weights file (random values) so the backbone counts as pretrained: the feature cache."""
    spec = backbones.get_backbone("mobilenet")
    model, _ = backbones.build_backbone(spec, 32, "none")
    path = tmp_path_factory.mktemp("w") / "mobilenet32.weights.h5"
    model.save_weights(path)
    keras.backend.clear_session()
    return str(path)


def test_three_trials_nested_under_one_parent_and_params_from(tracking_uri, tmp_path, sub_env):
    study = run_tune(_cfg(tmp_path, study_name="three"))
    assert len(study.trials) == 3
    (parent,) = _parent_of("three")
    children = _children(parent.info.run_id)
    assert len(children) == 3
    assert {c.data.tags["optuna_state"] for c in children} == {"COMPLETE"}
    assert all("val_f1_macro" in c.data.metrics for c in children)
    # Trial 0 is the training defaults, so the study can never recommend worse than them.
    defaults = search_space.baseline({}, head_only=False)
    assert study.trials[0].params == defaults
    assert defaults["learning_rate"] == HParams().learning_rate
    assert all(t.params != defaults for t in study.trials[1:])
    best = study.best_trial
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(best.value)
    assert parent.data.params["best_learning_rate"] == str(best.params["learning_rate"])
    assert parent.data.tags["best_trial_run_id"] == best.user_attrs["mlflow_run_id"]
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "trials.csv"} <= artifacts

    # train -P params_from=<study> trains with exactly those params.
    run_entry(
        "train",
        "--model",
        "mobilenet",
        "--weights",
        "none",
        "--image_size",
        "32",
        "--epochs",
        "1",
        "--fine_tune_epochs",
        "0",
        "--max_classes",
        "4",
        "--max_per_class",
        "12",
        "--register",
        "false",
        "--export_tflite",
        "false",
        "--params_from",
        "three",
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        env=sub_env,
    )
    train_run = mlflow.search_runs(
        filter_string="tags.step = 'train'", search_all_experiments=True, output_format="list"
    )[0]
    for key, value in best_params("three", f"sqlite:///{tmp_path / 'optuna.db'}").items():
        assert train_run.data.params[key] == str(value), key


def test_hard_pruner_prunes_and_tags(tracking_uri, tmp_path):
    study = run_tune(_cfg(tmp_path, study_name="pruned", n_trials=2, pruner="threshold:1.01"))
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states
    (parent,) = _parent_of("pruned")
    tags = {c.data.tags["optuna_state"] for c in _children(parent.info.run_id)}
    assert "PRUNED" in tags


def test_resume_adds_trials(tracking_uri, tmp_path):
    run_tune(_cfg(tmp_path, study_name="resume", n_trials=1))
    study = run_tune(_cfg(tmp_path, study_name="resume", n_trials=2))
    assert len(study.trials) == 3
    assert len(_parent_of("resume")) == 2


def test_cached_features_and_multi_objective(tracking_uri, tmp_path, pretrained_weights):
    study = run_tune(
        _cfg(
            tmp_path,
            study_name="mo",
            objectives="f1,latency",
            n_trials=3,
            weights=pretrained_weights,
            max_epochs=2,
            latency_runs=3,
        )
    )
    assert len(study.directions) == 2
    assert study.best_trials, "the Pareto front is empty"
    (parent,) = _parent_of("mo")
    assert parent.data.params["trial_mode"] == "cached_head"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert "pareto_front.png" in artifacts


@pytest.mark.postgres
def test_two_processes_share_one_postgres_study(tracking_uri, sub_env, postgres_url):
    args = [
        "--model",
        "mobilenet",
        "--weights",
        "none",
        "--image_size",
        "32",
        "--max_epochs",
        "1",
        "--max_classes",
        "3",
        "--max_per_class",
        "10",
        "--n_trials",
        "2",
        "--pruner",
        "none",
        "--study_name",
        "shared",
        "--storage",
        postgres_url,
    ]
    # Create the tracking database before the workers start, as a shared tracking server would
    # have it: two processes migrating one fresh SQLite file at once is not a supported set-up.
    mlflow.search_experiments()
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "entrypoints" / "tune.py"), *args],
            cwd=ROOT,
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 4 and len(set(numbers)) == 4
    parents = _parent_of("shared")
    assert len(parents) == 2
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    per_parent = [{c.info.run_id for c in _children(p.info.run_id)} for p in parents]
    assert all(len(ids) == 2 for ids in per_parent)
    assert run_ids == per_parent[0] | per_parent[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n_trials", "-1"], "must be > 0"),
        (["--pruner", "bogus"], "Unknown pruner 'bogus'"),
        (["--storage", "postgresql://postgres@127.0.0.1:1/nope"], "Cannot open Optuna storage"),
        (["--model", "resnet9000"], "Unknown backbone"),
    ],
)
def test_bad_parameters_fail_fast(sub_env, args, message):
    proc = run_entry("tune", *args, env=sub_env, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
