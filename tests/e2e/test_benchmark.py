"""`mlflow run . -e benchmark` runs end to end on a tiny configuration and logs every figure.

Benchmarks are not timed tests: nothing here compares a number with a goal.
"""

from __future__ import annotations

import math

import mlflow
import pytest
from e2e_utils import mlflow_run

pytestmark = pytest.mark.e2e

# Every figure issue 7 asks for, by section.
EXPECTED = {
    "inference": [
        "inference_ms_ours",
        "inference_ms_ours_tensorflow",
        "inference_ms_ours_pyfunc_base64",
        "inference_ms_keras_predict",
        "inference_ms_seed_method",
        "speedup_vs_keras_predict",
        "speedup_vs_seed_method",
    ],
    "serve": [
        "serve_p50_ms",
        "serve_p99_ms",
        "serve_req_per_s",
        "serve_errors",
        "serve8_p50_ms",
        "serve8_p99_ms",
        "serve8_req_per_s",
        "serve8_errors",
        "serve_int8_p50_ms",
        "serve_int8_req_per_s",
        "serve_int8_errors",
        "serve8_int8_errors",
    ],
    "edge": [
        "tflite_float32_ms",
        "tflite_int8_ms",
        "int8_speedup_vs_float",
        "model_macs",
        "peak_float32_gmacs",
        "peak_int8_gmacs",
        "float_latency_over_floor",
        "int8_latency_over_floor",
        "est_sim-1core_int8_latency_ms",
        "measured_sim-1core_int8_latency_ms",
        "est_over_measured_sim-1core_int8",
        "est_over_measured_sim-1core_float32",
    ],
    "pipeline": [
        "pipeline_img_per_s",
        "seed_loader_img_per_s",
        "pipeline_speedup_vs_seed_loader",
        "data_wait_fraction",
    ],
    "tuning": [
        "tuning_trial_s_cached",
        "tuning_trial_s_uncached",
        "tuning_trial_speedup_cached_features",
    ],
    "cpu_kernels": [
        "train_step_s_mobilenet_onednn_off",
        "train_step_s_mobilenet_onednn_on",
        "first_step_s_mobilenet_onednn_off",
        "infer_batch_s_mobilenet_onednn_on",
        "onednn_train_speedup_mobilenet",
        "first_step_s_mobilenet_onednn_on_grappler_off",
        "train_step_s_mobilenet_onednn_on_grappler_off",
        "no_grappler_first_step_speedup_mobilenet",
        "no_grappler_train_step_ratio_mobilenet",
    ],
}
TINY = [
    "--image_size",
    "32",
    "--runs",
    "5",
    "--rounds",
    "1",
    "--serve_seconds",
    "2",
    "--pipeline_images",
    "64",
    "--kernel_models",
    "mobilenet",
]


def test_benchmark_logs_every_metric_of_one_run(sub_env, tracking_uri, tmp_path):
    # Unset, so the params show what the entry point itself chose.
    env = {k: v for k, v in sub_env.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    proc = mlflow_run("benchmark", TINY, env=env, timeout=500)

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_name for r in runs] == ["benchmark"], "exactly one run, named benchmark"
    run = runs[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    missing = [m for names in EXPECTED.values() for m in names if m not in metrics]
    assert not missing, f"metrics not logged: {missing}"
    not_finite = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not not_finite, f"metrics that are not finite numbers: {not_finite}"
    assert metrics["serve_errors"] == 0 and metrics["serve8_errors"] == 0
    # The int8 file served side by side with the float32 one, just as cleanly.
    assert metrics["serve_int8_errors"] == 0 and metrics["serve8_int8_errors"] == 0
    assert metrics["model_macs"] > 0

    params = run.data.params
    assert params["cpu_model"] and int(params["cpu_cores"]) >= 1
    assert params["image_size"] == "32" and params["rounds"] == "1"
    assert params["model_under_test"] == "mobilenet_random_weights"
    assert params["serving_engine"] == "litert"
    # The entry point turns oneDNN on where TensorFlow would leave it off (AVX2-only CPUs).
    assert params["tf_enable_onednn_opts"] == "1" and params["kernel_models"] == "mobilenet"

    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/benchmark.md")
    for name in metrics:
        assert f"`{name}`" in table, f"{name} missing from benchmark.md"
    assert "| `speedup_vs_keras_predict` |" in proc.stdout, "the table is printed"
    # The served model lived in a scratch store that must not leak into the user's store.
    assert not mlflow.search_registered_models()
