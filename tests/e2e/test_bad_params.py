"""Bad parameters for every entry point: a clear message and a non-zero exit before any work.

Each case runs the real entry point as a subprocess against a fresh SQLite tracking store and
checks the message, the exit code, the time (seconds after the imports, never a long hang) and
that no MLflow run was started. The cases run two at a time (see ``outcomes``). Errors of
parsing and of the config dataclasses are checked in process (tests/code/test_entry_point_args.py);
one of them also goes through ``mlflow run`` here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from e2e_utils import ROOT, run_entry
from fast_fail import assert_fails_fast

pytestmark = pytest.mark.e2e

TINY = ["--weights", "none", "--image_size", "32", "--max_classes", "3", "--max_per_class", "8"]


# (entry point, arguments, extra environment, expected text in stderr). Only the cases that need
# a real process: a store, a storage URL or a dataset to open. Parse and config errors run in
# process (tests/code/test_entry_point_args.py); two of them stay here, run for real.
CASES = [
    # parse errors, as in tests/code/test_entry_point_args.py
    ("train", ["--epochs", "-1"], {}, "must be > 0, got -1"),
    (
        "tune",
        ["--storage", "postgresql://u:pw1234@127.0.0.1:1/db"],
        {},
        "storage=postgresql://u:***@127.0.0.1:1/db holds a password",
    ),
    # train
    ("train", ["--params_from", "study", "--storage", "not a url"], {}, "is not a storage URL"),
    ("train", ["--data", "/no/such/dataset"], {}, "/no/such/dataset"),
    # tune
    ("tune", ["--storage", "optuna.db"], {}, "is not a storage URL"),
    (
        "tune",
        ["--storage", "sqlite:////no/such/dir/optuna.db"],
        {},
        "folder /no/such/dir does not exist",
    ),
    ("tune", ["--storage", "mysql://u@127.0.0.1:1/db"], {}, "Cannot open Optuna storage"),
    ("tune", [], {"CARS_ML_OPTUNA_HEARTBEAT_S": "0"}, "CARS_ML_OPTUNA_HEARTBEAT_S='0' must be"),
    (
        "tune",
        [],
        {"CARS_ML_OPTUNA_HEARTBEAT_S": "20", "CARS_ML_OPTUNA_GRACE_S": "5"},
        "must be greater than CARS_ML_OPTUNA_HEARTBEAT_S=20",
    ),
    # main
    (
        "main",
        ["--storage", "sqlite:////no/such/dir/o.db"],
        {},
        "folder /no/such/dir does not exist",
    ),
    # distill
    ("distill", ["--teacher", "models:/stanford-cars-classifier/99"], {}, "does not resolve"),
    ("distill", ["--teacher", "runs:/abc/model"], {}, "is not a registered model URI"),
    # serve
    (
        "serve",
        ["--model_uri", "models:/nope@champion"],
        {},
        "models:/nope@champion does not resolve",
    ),
    # prepare_data
    ("prepare_data", ["--data", "/no/such/dataset"], {}, "/no/such/dataset"),
]


IDS = [f"{c[0]}:{' '.join(c[1]) or ','.join(c[2])}" for c in CASES]


def _run_case(case, folder: Path) -> tuple:
    entry, args, extra_env, _ = case
    folder.mkdir(parents=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    }
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env.update(
        MLFLOW_TRACKING_URI=uri,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        **extra_env,
    )
    started = time.monotonic()
    proc = run_entry(
        entry,
        *(TINY if entry in ("train", "tune", "distill") else []),
        *args,
        env=env,
        check=False,
        timeout=300,
    )
    return proc, time.monotonic() - started, uri


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    """Every case run once, two at a time: each is a process that mostly imports TensorFlow and
    MLflow on one core, so two run side by side in about the time of one."""
    base = tmp_path_factory.mktemp("bad_params")
    with ThreadPoolExecutor(2) as pool:
        futures = {
            i: pool.submit(_run_case, case, base / str(n))
            for n, (i, case) in enumerate(zip(IDS, CASES, strict=True))
        }
        return {i: future.result() for i, future in futures.items()}


@pytest.mark.parametrize(("entry", "args", "extra_env", "message"), CASES, ids=IDS)
def test_bad_parameter_fails_fast_with_clear_message(
    entry, args, extra_env, message, outcomes, request
):
    proc, elapsed, uri = outcomes[request.node.callspec.id]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_fails_fast(entry, elapsed)
    assert "pw1234" not in proc.stderr + proc.stdout
    # No work started: not one MLflow run in the store.
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []


def test_bad_parameter_through_mlflow_run_fails_with_the_entry_points_message(sub_env, tmp_path):
    """``mlflow run`` hands the parameter over as a string; the entry point's parser refuses it."""
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "-P", "epochs=-1"]
    proc = subprocess.run(
        [*command, "--env-manager", "local"],
        cwd=tmp_path,
        env=sub_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "must be > 0, got -1" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
