"""Bad parameters for every entry point: a clear message and a non-zero exit before any work.

Each case runs the real entry point as a subprocess against a fresh SQLite tracking store and
checks the message, the exit code, the time (seconds after the imports, never a long hang) and
that no MLflow run was started. The cases run two at a time (see ``outcomes``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from e2e_utils import ROOT, run_entry
from fast_fail import assert_fails_fast

pytestmark = pytest.mark.e2e

TINY = ["--weights", "none", "--image_size", "32", "--max_classes", "3", "--max_per_class", "8"]


# (entry point, arguments, extra environment, expected text in stderr)
# fmt: off
CASES = [
    # train
    ("train", ["--model", "resnet9000"], {}, "Unknown backbone"),
    ("train", ["--epochs", "-1"], {}, "must be > 0, got -1"),
    ("train", ["--epochs", "2.5"], {}, "expected a whole number"),
    ("train", ["--batch_size", "0"], {}, "must be > 0, got 0"),
    ("train", ["--learning_rate", "inf"], {}, "must be a finite number"),
    ("train", ["--dropout", "1.5"], {}, "must be between 0 and 1"),
    ("train", ["--dropout", "1"], {}, "Invalid hyperparameters: dropout=1.0"),
    ("train", ["--weight_decay", "-1"], {}, "weight_decay=-1.0"),
    ("train", ["--image_size", "16"], {}, "below mobilenet's minimum of 32 px"),
    ("train", ["--image_size", "100000"], {}, "above the maximum of"),
    ("train", ["--weights", "/no/such/weights.h5"], {}, "neither one of"),
    ("train", ["--register", "maybe"], {}, "expected true or false"),
    ("train", ["--params_from", "study", "--storage", "not a url"], {}, "is not a storage URL"),
    ("train", ["--data", "/no/such/dataset"], {}, "/no/such/dataset"),
    # tune
    ("tune", ["--n_trials", "0"], {}, "must be > 0, got 0"),
    ("tune", ["--timeout_s", "-5"], {}, "timeout_s must be >= 0"),
    ("tune", ["--pruner", "bogus"], {}, "Unknown pruner 'bogus'"),
    ("tune", ["--trial_fraction", "0"], {}, "trial_fraction must be in (0, 1]"),
    ("tune", ["--trial_fraction", "1.5"], {}, "must be between 0 and 1, got 1.5"),
    ("tune", ["--objectives", "latency"], {}, "is not valid; use 'f1' or 'f1,latency'"),
    ("tune", ["--pin", "nonsense=1"], {}, "Cannot pin 'nonsense=1'"),
    ("tune", ["--storage", "optuna.db"], {}, "is not a storage URL"),
    ("tune", ["--storage", "sqlite:////no/such/dir/optuna.db"], {}, "folder /no/such/dir does not exist"),
    ("tune", ["--storage", "postgresql://u:pw1234@127.0.0.1:1/db"], {},
     "storage=postgresql://u:***@127.0.0.1:1/db holds a password"),
    ("train", ["--storage", "postgresql://u@127.0.0.1:1/db?password=pw1234"], {}, "put the password in PGPASSWORD"),
    ("main", ["--storage", "postgresql://:pw1234@127.0.0.1:1/db"], {}, "rotate this password"),
    ("tune", ["--storage", "mysql://u@127.0.0.1:1/db"], {}, "Cannot open Optuna storage"),
    ("tune", [], {"CARS_ML_OPTUNA_HEARTBEAT_S": "0"}, "CARS_ML_OPTUNA_HEARTBEAT_S='0' must be"),
    ("tune", [], {"CARS_ML_OPTUNA_HEARTBEAT_S": "20", "CARS_ML_OPTUNA_GRACE_S": "5"},
     "must be greater than CARS_ML_OPTUNA_HEARTBEAT_S=20"),
    # main
    ("main", ["--models", "mobilenet,bogus"], {}, "Unknown backbone"),
    ("main", ["--models", ","], {}, "models is empty"),
    ("main", ["--n_trials", "-4"], {}, "must be >= 0, got -4"),
    ("main", ["--trial_fraction", "2"], {}, "must be between 0 and 1, got 2"),
    ("main", ["--max_latency_ms", "-5"], {}, "must be >= 0 (or none)"),
    ("main", ["--models", "mobilenet,inception", "--image_size", "64"], {}, "below inception's minimum"),
    ("main", ["--storage", "sqlite:////no/such/dir/o.db"], {}, "folder /no/such/dir does not exist"),
    ("main", ["--weights", "/no/such.h5"], {}, "neither one of"),
    # promote
    ("promote", ["--max_latency_ms", "-1"], {}, "must be >= 0 (or none), got -1"),
    ("promote", ["--metric", "loss"], {}, "invalid choice: 'loss'"),
    ("promote", ["--min_improvement", "2"], {}, "must be between 0 and 1, got 2"),
    # distill
    ("distill", [], {}, "teacher is required"),
    ("distill", ["--teacher", "models:/stanford-cars-classifier/99"], {}, "does not resolve"),
    ("distill", ["--teacher", "runs:/abc/model"], {}, "is not a registered model URI"),
    ("distill", ["--teacher", "models:/m/1", "--student", "tinynet"], {}, "Unknown backbone 'tinynet'"),
    ("distill", ["--teacher", "models:/m/1", "--temperature", "0"], {}, "must be > 0, got 0"),
    ("distill", ["--teacher", "models:/m/1", "--alpha", "1.5"], {}, "alpha=1.5 must be between 0 and 1"),
    ("main", ["--temperature", "-1"], {}, "must be > 0, got -1"),
    ("main", ["--distill_students", "tinynet"], {}, "Unknown backbone 'tinynet'"),
    # predict
    ("predict", [], {}, "images is required"),
    ("predict", ["--images", "/no/such/folder"], {}, "is not a folder"),
    ("predict", ["--images", ".", "--batch_size", "100000"], {}, "must be between 1 and the serving limit"),
    # serve
    ("serve", ["--port", "70000"], {}, "must be between 1 and 65535"),
    ("serve", ["--workers", "0"], {}, "must be > 0, got 0"),
    ("serve", ["--host", "example.com"], {}, "is not an IP address"),
    ("serve", ["--model_uri", "models:/nope@champion"], {}, "models:/nope@champion does not resolve"),
    # prepare_data
    ("prepare_data", ["--val_fraction", "0.9"], {}, "must be between 0 and 0.5"),
    ("prepare_data", ["--data", "/no/such/dataset"], {}, "/no/such/dataset"),
    # benchmark
    ("benchmark", ["--sections", "inference,warp"], {}, "unknown benchmark section(s) ['warp']"),
    ("benchmark", ["--image_size", "8"], {}, "must be >= 32 px"),
    ("benchmark", ["--serve_seconds", "-3"], {}, "must be > 0"),
]
# fmt: on


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
