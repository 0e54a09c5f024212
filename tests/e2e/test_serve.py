"""`mlflow models serve` on the registered champion: real photos in, class names out, bad input 400."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import served_model
from PIL import Image
from servers import free_port, process_group, wait_http
from serving_helpers import (
    CAR_NAMES,
    b64_file,
    log_classifier,
    register_champion,
    tiny_mobilenet,
)

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[2]


def post(port: int, body) -> tuple[int, dict]:
    reply = served_model.post(port, body)
    return reply.status, reply.json()


def wait_until_up(proc: subprocess.Popen, port: int, log_path) -> None:
    wait_http(f"http://127.0.0.1:{port}/ping", proc, log_path, timeout_s=START_TIMEOUT_S)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture()
def server(tracking_uri, tmp_path, monkeypatch):
    """The champion served on a free port; the whole process group is killed afterwards."""
    monkeypatch.chdir(tmp_path)
    register_champion(tiny_mobilenet(), CAR_NAMES)
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/stanford-cars-classifier@champion",
        "--env-manager",
        "local",
        "-p",
        str(port),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    # The whole group is stopped afterwards: the MLflow CLI and the uvicorn server it started.
    with process_group(command, env, log_path) as proc:
        wait_until_up(proc, port, log_path)
        yield port, proc


def test_serves_real_photos_and_refuses_bad_input_with_400(server, car_photos):
    port, proc = server
    photos = [b64_file(p) for p in car_photos]
    good_requests = [
        {"dataframe_split": {"columns": ["image"], "data": [[p] for p in photos]}},
        {"inputs": {"image": photos}},
    ]
    for body in good_requests:
        status, answer = post(port, body)
        assert status == 200, answer
        predictions = answer["predictions"]
        assert len(predictions) == len(photos)
        for prediction in predictions:
            assert prediction["label"] in CAR_NAMES
            assert CAR_NAMES[prediction["class_id"]] == prediction["label"]
            assert 0.0 <= prediction["probability"] <= 1.0
            assert [item["label"] for item in prediction["top_k"]][0] == prediction["label"]

    bomb = png_b64(Image.new("1", (10_000, 10_000)))  # ~16 KB on the wire, 100 megapixels
    too_big = base64.b64encode(os.urandom(11 * 1024 * 1024)).decode()
    tiny = png_b64(Image.new("RGB", (4, 4)))
    bad_requests = {
        "image 0: not an image": {"inputs": {"image": [base64.b64encode(b"hello").decode()]}},
        "image 1: invalid base64": {"inputs": {"image": [photos[0], "%%% not base64 %%%"]}},
        "missing column 'image'": {"dataframe_split": {"columns": ["img"], "data": [[photos[0]]]}},
        "unexpected column(s) ['extra']": {
            "dataframe_split": {"columns": ["image", "extra"], "data": [[photos[0], 1]]}
        },
        "image 0: expected a base64-encoded image string, got int": {
            "dataframe_split": {"columns": ["image"], "data": [[5]]}
        },
        "over the limit of 10485760 bytes": {"inputs": {"image": [too_big]}},
        "decompression bomb protection": {"inputs": {"image": [bomb]}},
        "empty request": {"inputs": {"image": []}},
        "too many images in one request: 65 > max_images_per_request=64": {
            "inputs": {"image": [tiny] * 65}
        },
    }
    for message, body in bad_requests.items():
        status, answer = post(port, body)
        assert status == 400, (message, answer)
        assert message in answer["message"], answer["message"][:500]
        # The reason comes back on its own, not after an echo of megabytes of request.
        assert len(answer["message"]) < 1000, answer["message"][:300]
    status, answer = post(port, b"")
    assert status == 400 and "valid JSON" in answer["message"]

    status, answer = post(port, {"inputs": {"image": photos[:1]}})
    assert status == 200 and answer["predictions"][0]["label"] in CAR_NAMES
    assert proc.poll() is None, "the server must keep running"


def _serve_entry(args: list[str], env: dict, log_path):
    """The `serve` entry point in its own process group (stopped after), output in ``log_path``."""
    return process_group(
        [sys.executable, str(ROOT / "entrypoints" / "serve.py"), *args], env, log_path
    )


def test_serve_entry_point_serves_and_stops_on_sigterm(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = [sys.executable, str(ROOT / "entrypoints" / "serve.py")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    missing = subprocess.run([*entry, "--port", "5999"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "models:/stanford-cars-classifier@champion does not resolve" in missing.stderr

    register_champion(tiny_mobilenet(), CAR_NAMES)
    port = free_port()
    log_path = tmp_path / "serve-entry.log"
    with _serve_entry(["--port", str(port)], env, log_path) as proc:
        wait_until_up(proc, port, log_path)
        # Signal only the entry-point process: it became the MLflow CLI, which must take the
        # uvicorn server down with it.
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            except OSError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the server still answers after SIGTERM to the serve entry point")


def test_serve_entry_point_serves_the_int8_file(tracking_uri, tmp_path, monkeypatch):
    """`serve -P precision=int8`: the real server answers from the int8 file (logits in steps of
    its output scale) with the same labels as the float model."""
    from serving_helpers import COLOURS, colour_classifier, colour_images

    from cars_ml import tracking
    from cars_ml.export.tflite import export_tflite

    monkeypatch.chdir(tmp_path)
    model, names = colour_classifier()
    calibration, _ = colour_images(64, seed=1)
    files = export_tflite(model, tmp_path / "tflite", calibration)
    with tracking.start_run("serving-int8"):
        info = log_classifier(
            model, names, 32, litert_model=files["float32"], litert_int8_model=files["int8"]
        )
    version = tracking.register_model(info.model_uri, "stanford-cars-classifier")
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(
        "stanford-cars-classifier", "champion", version.version
    )
    port = free_port()
    log_path = tmp_path / "serve-int8.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with _serve_entry(["--port", str(port), "--precision", "int8"], env, log_path) as proc:
        wait_until_up(proc, port, log_path)
        images, labels = colour_images(6, seed=9)
        status, answer = post(
            port, {"inputs": {"image": [png_b64(Image.fromarray(i)) for i in images]}}
        )
        assert status == 200, answer
        got = [p["label"] for p in answer["predictions"]]
        assert got == [list(COLOURS)[i] for i in labels]
        # The int8 file's logits are whole steps of its output scale, so the log-ratio of any
        # two served probabilities is a whole number of steps too.
        from ai_edge_litert.interpreter import Interpreter

        step = Interpreter(model_path=str(files["int8"])).get_output_details()[0]["quantization"][0]
        assert step > 0
        for prediction in answer["predictions"]:
            top = [item["probability"] for item in prediction["top_k"]]
            steps = np.log(np.array(top[1:]) / top[0]) / step
            assert np.allclose(steps, np.round(steps), atol=1e-2), prediction
        assert "(int8)" in log_path.read_text()
