"""Bad parameters for every entry point, in process: a clear one-line error and exit code 2.

Each case parses its arguments with the entry point's own parser and builds its step's config
(``config(args)``), through ``run_main`` as the script does, and checks the message, the exit
code and that no traceback or password reaches the output. These cases need no MLflow store, so
they run here in milliseconds; those that do (a store, a storage URL, a dataset to open), and a
couple of these through a real process and ``mlflow run``, are in tests/e2e/test_bad_params.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "entrypoints"))

import _common  # noqa: E402

TINY = ["--weights", "none", "--image_size", "32", "--max_classes", "3", "--max_per_class", "8"]

# (entry point, arguments, extra environment, expected text in stderr)
CASES = [
    # train
    ("train", ["--model", "resnet9000"], {}, "Unknown backbone"),
    ("train", ["--epochs", "-1"], {}, "must be > 0, got -1"),
    ("train", ["--epochs", "2.5"], {}, "expected a whole number"),
    ("train", ["--batch_size", "0"], {}, "must be > 0, got 0"),
    ("train", ["--learning_rate", "inf"], {}, "must be a finite number"),
    ("train", ["--dropout", "1.5"], {}, "must be between 0 and 1"),
    ("train", ["--dropout", "1"], {}, "Invalid hyperparameters: dropout=1.0"),
    ("train", ["--weight_decay", "-1"], {}, "must be a finite number >= 0, got -1"),
    ("train", ["--image_size", "16"], {}, "below mobilenet's minimum of 32 px"),
    ("train", ["--image_size", "100000"], {}, "above the maximum of"),
    ("train", ["--weights", "/no/such/weights.h5"], {}, "neither one of"),
    ("train", ["--register", "maybe"], {}, "expected true or false"),
    # tune
    ("tune", ["--n_trials", "0"], {}, "must be > 0, got 0"),
    ("tune", ["--timeout_s", "-5"], {}, "must be a finite number >= 0, got -5"),
    ("tune", ["--pruner", "bogus"], {}, "Unknown pruner 'bogus'"),
    ("tune", ["--trial_fraction", "0"], {}, "trial_fraction must be in (0, 1]"),
    ("tune", ["--trial_fraction", "1.5"], {}, "must be between 0 and 1, got 1.5"),
    ("tune", ["--objectives", "latency"], {}, "is not valid; use 'f1' or 'f1,latency'"),
    ("tune", ["--pin", "nonsense=1"], {}, "Cannot pin 'nonsense=1'"),
    (
        "tune",
        ["--storage", "postgresql://u:pw1234@127.0.0.1:1/db"],
        {},
        "storage=postgresql://u:***@127.0.0.1:1/db holds a password",
    ),
    # train
    (
        "train",
        ["--storage", "postgresql://u@127.0.0.1:1/db?password=pw1234"],
        {},
        "put the password in PGPASSWORD",
    ),
    # main
    ("main", ["--storage", "postgresql://:pw1234@127.0.0.1:1/db"], {}, "rotate this password"),
    ("main", ["--models", "mobilenet,bogus"], {}, "Unknown backbone"),
    ("main", ["--data", "/data/cars", "--preset", "demo"], {}, "preset=demo is the synthetic"),
    ("main", ["--preset", "fast"], {}, "invalid choice: 'fast'"),
    ("main", ["--n_trials", "-4"], {}, "must be >= 0, got -4"),
    ("main", ["--trial_fraction", "2"], {}, "must be between 0 and 1, got 2"),
    ("main", ["--max_latency_ms", "-5"], {}, "must be >= 0 (or none)"),
    (
        "main",
        ["--models", "mobilenet,inception", "--image_size", "64"],
        {},
        "below inception's minimum",
    ),
    ("main", ["--weights", "/no/such.h5"], {}, "neither one of"),
    # promote
    ("promote", ["--max_latency_ms", "-1"], {}, "must be >= 0 (or none), got -1"),
    ("promote", ["--metric", "loss"], {}, "invalid choice: 'loss'"),
    ("promote", ["--min_improvement", "2"], {}, "must be between 0 and 1, got 2"),
    # distill
    ("distill", [], {}, "teacher is required"),
    (
        "distill",
        ["--teacher", "models:/m/1", "--student", "tinynet"],
        {},
        "Unknown backbone 'tinynet'",
    ),
    ("distill", ["--teacher", "models:/m/1", "--temperature", "0"], {}, "must be > 0, got 0"),
    (
        "distill",
        ["--teacher", "models:/m/1", "--alpha", "1.5"],
        {},
        "alpha=1.5 must be between 0 and 1",
    ),
    # main
    ("main", ["--temperature", "-1"], {}, "must be > 0, got -1"),
    ("main", ["--distill_students", "tinynet"], {}, "Unknown backbone 'tinynet'"),
    # predict
    ("predict", [], {}, "images is required"),
    ("predict", ["--images", "/no/such/folder"], {}, "is not a folder"),
    (
        "predict",
        ["--images", ".", "--batch_size", "100000"],
        {},
        "must be between 1 and the serving limit",
    ),
    # serve
    ("serve", ["--port", "70000"], {}, "must be between 1 and 65535"),
    ("serve", ["--workers", "0"], {}, "must be > 0, got 0"),
    ("serve", ["--host", "example.com"], {}, "is not an IP address"),
    # prepare_data
    ("prepare_data", ["--val_fraction", "0.9"], {}, "must be between 0 and 0.5"),
    # benchmark
    ("benchmark", ["--sections", "inference,warp"], {}, "unknown benchmark section(s) ['warp']"),
    ("benchmark", ["--image_size", "8"], {}, "must be >= 32 px"),
    ("benchmark", ["--serve_seconds", "-3"], {}, "must be > 0"),
]
IDS = [f"{c[0]}:{' '.join(c[1]) or ','.join(c[2])}" for c in CASES]


@pytest.mark.parametrize(("entry", "args", "extra_env", "message"), CASES, ids=IDS)
def test_bad_parameter_is_refused_with_a_clear_message(
    entry, args, extra_env, message, monkeypatch, capsys
):
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in extra_env.items():
        monkeypatch.setenv(name, value)
    # run_main turns SIGTERM into KeyboardInterrupt for the script's process; not for pytest's.
    monkeypatch.setattr(_common, "install_sigterm_handler", lambda: None)
    module = importlib.import_module(entry)
    argv = [*(TINY if entry in ("train", "tune", "distill") else []), *args]
    with pytest.raises(SystemExit) as exited:
        _common.run_main(lambda: module.config(module.build_parser().parse_args(argv)))
    out = capsys.readouterr()
    assert exited.value.code == 2, out.err
    assert message in out.err, out.err
    assert "Traceback" not in out.err, out.err
    assert "pw1234" not in out.err + out.out
