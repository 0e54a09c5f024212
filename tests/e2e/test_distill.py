"""`mlflow run . -e distill` end to end on synthetic data: a registered student with lineage, a
distillation study whose trials reuse the teacher's cached outputs, and each bad input refused
before any training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from e2e_utils import ROOT, run_entry

pytestmark = pytest.mark.e2e

NAME = "stanford-cars-classifier"
# Four synthetic classes at 48 px, three epochs from scratch: tens of seconds per training.
TINY = [
    "--weights",
    "none",
    "--image_size",
    "48",
    "--epochs",
    "3",
    "--fine_tune_epochs",
    "0",
    "--max_classes",
    "4",
    "--max_per_class",
    "16",
]


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory) -> Path:
    """A store holding the registered teacher: a small MobileNet trained once for this module."""
    folder = tmp_path_factory.mktemp("teacher-store")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "CARS_ML_CACHE": str(folder / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # Run in the folder, so that the store's ./mlruns artifacts stay there.
    run_entry("train", "--model", "mobilenet", *TINY, env=env, timeout=600, cwd=folder)
    return folder / "mlflow.db"


@pytest.fixture()
def teacher(teacher_store, sub_env, tmp_path) -> str:
    """A copy of the teacher's store as this test's store; the teacher is version 1.

    The copy refers to the teacher's artifacts in the module's folder, where new runs' artifacts
    go too (under their own run ids), so each test starts from the same registry.
    """
    shutil.copy(teacher_store, tmp_path / "mlflow.db")
    sub_env["CARS_ML_CACHE"] = str(tmp_path / "cache")
    return f"models:/{NAME}/1"


def _teacher_caches(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "teachers").glob("teacher-*.npz"))


def test_mlflow_run_distill_registers_a_student_with_lineage(teacher, sub_env, tmp_path):
    params = {
        "teacher": teacher,
        "student": "mobilenet_v3_small",
        "temperature": "3",
        "alpha": "0.3",
        **dict(zip((k.lstrip("-") for k in TINY[::2]), TINY[1::2], strict=True)),
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "distill",
        "--env-manager",
        "local",
        "--experiment-name",
        "distill-e2e",
        *(x for k, v in params.items() for x in ("-P", f"{k}={v}")),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=sub_env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"distilled from {teacher}" in proc.stdout

    client = mlflow.MlflowClient()
    student = client.get_model_version(NAME, "2")
    assert student.tags["distilled_from"] == teacher
    assert student.tags["teacher_backbone"] == "mobilenet"
    assert student.tags["backbone"] == "mobilenet_v3_small"
    run = client.get_run(student.run_id)
    metrics = run.data.metrics
    assert run.data.tags["step"] == "distill"
    assert run.data.tags["distilled_from"] == teacher
    assert float(run.data.params["temperature"]) == 3.0 and float(run.data.params["alpha"]) == 0.3
    # An ordinary train run: the same schema and edge metrics, plus the lineage metrics.
    for name in ("test_f1_macro", "latency_ms_p95", "model_size_mb", "int8_f1_drop"):
        assert np.isfinite(metrics[name]), name
    teacher_f1 = client.get_run(client.get_model_version(NAME, "1").run_id).data.metrics[
        "test_f1_macro"
    ]
    # The teacher is scored on the student's own test split, which here is the teacher's too.
    assert metrics["teacher_test_f1_macro"] == pytest.approx(teacher_f1, abs=1e-6)
    assert metrics["distill_gap"] == pytest.approx(
        metrics["teacher_test_f1_macro"] - metrics["test_f1_macro"], abs=1e-9
    )
    # The student serves like any version, and is evaluated and traced like any train run.
    assert "tflite" in {a.path for a in client.list_artifacts(run.info.run_id)}
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confused_pairs.csv" in evaluation
    assert len(run.inputs.dataset_inputs) == 3
    assert student.tags["tflite_int8_uri"].startswith(f"runs:/{run.info.run_id}/tflite/")
    assert len(_teacher_caches(tmp_path)) == 1


def test_distillation_study_reuses_the_teachers_outputs(teacher, sub_env, tmp_path):
    """Two trials and a final training of a student: the teacher's outputs on the evaluation
    images are computed once, then read from the cache."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = run_entry(
        "tune",
        "--model",
        "mobilenet",
        "--teacher",
        teacher,
        "--n_trials",
        "2",
        "--max_epochs",
        "1",
        "--storage",
        storage,
        "--study_name",
        "kd",
        "--weights",
        "none",
        "--image_size",
        "48",
        "--max_classes",
        "4",
        "--max_per_class",
        "16",
        env=sub_env,
        timeout=600,
    )
    (cache,) = _teacher_caches(tmp_path)
    written = cache.stat().st_mtime_ns
    assert out.stderr.count("Cached teacher outputs") == 1
    (study,) = mlflow.search_runs(filter_string="tags.step = 'tune'", output_format="list")
    assert study.data.tags["distilled_from"] == teacher
    assert 0.0 <= study.data.metrics["teacher_val_f1_macro"] <= 1.0
    trials = mlflow.search_runs(filter_string="tags.step = 'tune_trial'", output_format="list")
    assert len(trials) == 2
    for trial in trials:
        assert {"temperature", "alpha"} <= set(trial.data.params)

    final = run_entry(
        "distill",
        "--teacher",
        teacher,
        "--student",
        "mobilenet",
        "--params_from",
        "kd",
        "--storage",
        storage,
        "--register",
        "false",
        "--export_tflite",
        "false",
        *TINY,
        env=sub_env,
        timeout=600,
    )
    assert "Cached teacher outputs" not in final.stderr
    assert _teacher_caches(tmp_path) == [cache] and cache.stat().st_mtime_ns == written
    (student,) = mlflow.search_runs(filter_string="tags.step = 'distill'", output_format="list")
    best = mlflow.search_runs(filter_string="tags.step = 'tune'", output_format="list")[0]
    assert student.data.params["alpha"] == best.data.params["best_alpha"]


def test_a_teacher_with_other_classes_is_refused_before_training(teacher, sub_env):
    args = [a if a != "4" else "3" for a in TINY]  # three classes: not the teacher's four
    proc = run_entry("distill", "--teacher", teacher, *args, env=sub_env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "class names differ from the dataset's" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not mlflow.search_runs(filter_string="tags.step = 'distill'", output_format="list")
