"""Multi-device training: the mirrored path on a CPU split into two logical devices, for real.

The split must happen before TensorFlow starts, so the training runs in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import tensorflow as tf

from cars_ml.modeling import distribute

ROOT = Path(__file__).resolve().parents[2]

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json
    from cars_ml.data import DataConfig
    from cars_ml.training.fit import HParams
    from cars_ml.training.run import TrainConfig, run_train

    out = run_train(TrainConfig(
        model="mobilenet", data=DataConfig(max_classes=3, max_per_class=8), weights="none",
        image_size=32, hparams=HParams(epochs=1, fine_tune_epochs=0, batch_size=8),
        register=False, export_tflite=False, benchmark_runs=3, verbose=0))
    print("RESULT " + json.dumps({"run_id": out.run_id}))
    """
)


def test_two_logical_cpus_train_one_run_mirrored(tracking_uri, tmp_path):
    env = {
        **os.environ,
        distribute.CPU_DEVICES_ENV: "2",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    run = mlflow.get_run(json.loads(line[len("RESULT ") :])["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["distribution_strategy"] == "MirroredStrategy"
    assert run.data.params["num_replicas"] == "2"
    assert 0.0 <= run.data.metrics["test_f1_macro"] <= 1.0


def test_default_strategy_without_gpus_or_a_cpu_split(monkeypatch):
    monkeypatch.delenv(distribute.CPU_DEVICES_ENV, raising=False)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("several GPUs: auto mirrors here")
    strat = distribute.strategy("auto")
    assert distribute.describe(strat) == {
        "distribution_strategy": "DefaultDistributionStrategy",
        "num_replicas": 1,
    }


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_cpu_split_is_refused_with_the_fix(monkeypatch, value):
    monkeypatch.setenv(distribute.CPU_DEVICES_ENV, value)
    with pytest.raises(ValueError, match="CARS_ML_CPU_DEVICES=.*whole number >= 1"):
        distribute.strategy("auto")


def test_unknown_devices_and_multi_worker_are_refused_with_the_alternative():
    from cars_ml.training.run import TrainConfig

    with pytest.raises(ValueError, match="not one of auto, default, mirrored"):
        distribute.strategy("tpu")
    for refuse in (
        lambda: distribute.strategy("multi_worker"),
        lambda: TrainConfig(devices="multi_worker"),
    ):
        with pytest.raises(ValueError, match="Keras 3.15.1.*devices=mirrored.*tune workers"):
            refuse()
    with pytest.raises(ValueError, match="devices='gpus'"):
        TrainConfig(devices="gpus")
