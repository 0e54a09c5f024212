"""The edge agent's pure parts in-process: measuring a flatbuffer, feeding integer inputs,
which versions are pending, the order of the writes, and one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "edge"))

from cars_ml_edge import calibrate, cli, measure, registry  # noqa: E402


def test_latency_of_a_probe_is_ordered_and_positive():
    numbers = measure.latency(calibrate.probe_path("int8").read_bytes(), 1, runs=15, warmup=2)
    assert set(numbers) == {
        "load_ms",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_p99",
        "peak_rss_mb",
    }
    assert 0 < numbers["latency_ms_p50"] <= numbers["latency_ms_p95"] <= numbers["latency_ms_p99"]
    assert numbers["load_ms"] > 0 and numbers["peak_rss_mb"] > 1


def test_bad_measure_arguments_raise_value_error():
    content = calibrate.probe_path("float32").read_bytes()
    with pytest.raises(ValueError, match="runs must be"):
        measure.latency(content, 1, runs=0)
    with pytest.raises(ValueError, match="threads"):
        measure.interpreter(content, 0)
    with pytest.raises(ValueError, match="image input"):
        measure.input_size(content)


def test_inputs_are_quantized_as_the_tensor_says():
    pixels = np.array([[0, 100, 255]], dtype=np.uint8)
    as_float = measure.to_input(pixels, {"dtype": np.float32, "quantization": (0.0, 0)})
    assert as_float.dtype == np.float32 and as_float.tolist() == [[0, 100, 255]]
    same = measure.to_input(pixels, {"dtype": np.uint8, "quantization": (1.0, 0)})
    assert same.tolist() == [[0, 100, 255]]
    shifted = measure.to_input(pixels, {"dtype": np.int8, "quantization": (1.0, -128)})
    assert shifted.dtype == np.int8 and shifted.tolist() == [[-128, -28, 127]]


def test_peak_gmacs_gives_both_precisions():
    peaks = calibrate.peak_gmacs(1, runs=5, warmup=1)
    assert set(peaks) == {"peak_float32_gmacs", "peak_int8_gmacs"}
    assert all(value > 0 for value in peaks.values())
    assert calibrate.probe_macs() == 256 * 256 * 256


class _Recorder:
    """An MlflowClient stand-in that records the write calls in order."""

    def __init__(self, versions=()):
        self.calls, self._versions = [], list(versions)

    def log_batch(self, run_id, metrics, tags):
        self.calls.append(("log_batch", run_id, {m.key for m in metrics}, {t.key for t in tags}))

    def set_model_version_tag(self, name, version, key, value):
        self.calls.append(("tag", version, key))

    def search_model_versions(self, query):
        assert query == "name='stanford-cars-classifier'"
        return self._versions


def test_metrics_go_in_one_batch_then_tags_with_the_marker_last():
    client = _Recorder()
    version = registry.Version(4, "run4", {})
    metrics = {"device_pi5_int8_latency_ms_p95": 4.1, "device_pi5_float32_latency_ms_p95": 11.2}
    registry.log_measurement(client, registry.MODEL_NAME, version, "pi5", metrics, 1, "{}")
    assert [c[0] for c in client.calls].count("log_batch") == 1
    assert client.calls[0] == ("log_batch", "run4", set(metrics), {"device.pi5.facts"})
    tags = [c[2] for c in client.calls[1:]]
    assert tags[-1] == "device.pi5.measured_at"
    assert set(tags) == {
        "device.pi5.int8_latency_ms_p95",
        "device.pi5.float32_latency_ms_p95",
        "device.pi5.threads",
        "device.pi5.facts",
        "device.pi5.measured_at",
    }


def _mv(number: int, tags: dict):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    tags = [ModelVersionTag(key, value) for key, value in tags.items()]
    return ModelVersion("stanford-cars-classifier", str(number), 0, run_id=f"r{number}", tags=tags)


def test_pending_versions_are_those_without_the_marker_newest_first():
    client = _Recorder(
        [_mv(1, {"device.pi5.measured_at": "x"}), _mv(3, {"device.pi5.threads": "1"}), _mv(2, {})]
    )
    assert [
        v.version for v in registry.versions_to_measure(client, registry.MODEL_NAME, "pi5", None)
    ] == [3, 2]
    assert [
        v.version for v in registry.versions_to_measure(client, registry.MODEL_NAME, "pi4", None)
    ] == [3, 2, 1]
    assert [
        v.version for v in registry.versions_to_measure(client, registry.MODEL_NAME, "pi5", [1])
    ] == [1]
    with pytest.raises(LookupError, match="no version 9"):
        registry.versions_to_measure(client, registry.MODEL_NAME, "pi5", [1, 9])


@pytest.mark.parametrize("name", ["Pi5", "-pi", "pi 5", "p" * 41, "pi.5", ""])
def test_a_bad_device_name_is_one_line_and_exit_2(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--tracking-uri", "http://x", "--device", name])
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_passwords_are_masked_and_errors_explained():
    assert cli.masked("https://ann:s3cret@mlflow.lan:5000/x") == "https://ann:***@mlflow.lan:5000/x"
    assert cli.masked("http://mlflow.lan:5000") == "http://mlflow.lan:5000"
    refused = MlflowException(
        "API request to endpoint /api/2.0/mlflow/experiments/search failed "
        "with error code 401 != 200. Response body: 'Unauthorized'"
    )
    assert "MLFLOW_TRACKING_USERNAME" in cli._problem(refused, "http://h:5000")
    away = MlflowException(
        "API request to http://h:1/api failed with exception "
        "HTTPConnectionPool(host='h', port=1): Max retries exceeded"
    )
    assert "cannot reach the tracking server at http://h:1" in cli._problem(away, "http://h:1")
    assert cli._problem(ValueError("other"), "http://h") is None


def test_scrubbed_masks_passwords_inside_messages():
    text = "API request to http://ann:s3cret@h:5000/api failed"
    assert cli.scrubbed(text) == "API request to http://ann:***@h:5000/api failed"


def test_agent_pins_are_the_projects_and_agree_with_each_other():
    edge = Path(__file__).resolve().parents[2] / "deploy" / "edge"
    pins = [
        line
        for line in (edge / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    pyproject = (edge / "pyproject.toml").read_text()
    assert all(f'"{pin}"' in pyproject for pin in pins), pins
    project = (edge.parents[1] / "pyproject.toml").read_text()
    for pin in pins:
        # mlflow-skinny is the client half of the project's mlflow, at the same version.
        assert f'"{pin.replace("mlflow-skinny", "mlflow")}"' in project, pin
    assert "tensorflow" not in pyproject and 'cars-ml"' not in pyproject


def test_credentials_over_plain_http_to_another_host_get_a_loud_warning():
    password = {"MLFLOW_TRACKING_PASSWORD": "pw"}
    warning = cli.plain_http_warning("http://mlflow.example.com:5000", password)
    assert warning.startswith("WARNING:") and "unencrypted" in warning and "https" in warning
    assert "secret" not in cli.plain_http_warning("http://u:secret@10.0.0.5:5000", {})
    assert cli.plain_http_warning("https://mlflow.example.com", password) is None
    assert cli.plain_http_warning("http://127.0.0.1:5000", password) is None
    assert cli.plain_http_warning("http://mlflow.example.com:5000", {}) is None  # no credentials
