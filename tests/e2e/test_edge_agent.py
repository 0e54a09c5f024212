"""The edge agent as a user runs it: installed with ``pip install ./deploy/edge`` into a virtual
environment without TensorFlow or cars-ml, pinned to one core as device ``sim-1core``, against a
real ``mlflow server``. It measures the registered versions, logs metrics and tags, stores the
device profile, measures nothing twice, skips a version without tflite files, stops cleanly on
SIGTERM and fails in one line when the server is away."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from servers import free_port, sqlite_tracking_server
from serving_helpers import colour_images

from cars_ml import SERVING_CODE_TAG, SERVING_CODE_VERSION

ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "deploy" / "edge"
MODEL = "stanford-cars-classifier"
DEVICE = "sim-1core"
P = f"device_{DEVICE}"

pytestmark = pytest.mark.e2e


def _package_hash() -> str:
    """Changes whenever the agent's pins or its code change, so a stale venv is never reused."""
    digest = hashlib.sha256()
    files = [EDGE / "requirements.txt", EDGE / "pyproject.toml"]
    files += sorted(p for p in (EDGE / "cars_ml_edge").rglob("*") if p.is_file())
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(EDGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def edge_venv() -> Path:
    """A venv with only ``pip install ./deploy/edge`` in it, built once per package hash.

    It lives under ``~/.cache/cars-ml`` rather than ``$CARS_ML_CACHE``, which the test
    conftest points at a fresh folder for every session.
    """
    cache = Path.home() / ".cache" / "cars-ml"
    venv = cache / f"edge-venv-{_package_hash()}"
    if (venv / ".complete").exists():
        (venv / ".complete").touch()  # Marks it in use for the clean-up below.
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed, so an interrupted build is never taken for a finished one.
    building = cache / f".edge-venv-building-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=120)
    # The copy keeps build artefacts (build/, *.egg-info) out of the source tree.
    source = building / "src"
    shutil.copytree(EDGE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = subprocess.run(
        [str(building / "bin" / "pip"), "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(source)
    (building / ".complete").write_text(f"built in {time.monotonic() - start:.0f} s\n")
    try:
        building.rename(venv)
    except OSError:  # Another session finished the same venv first.
        shutil.rmtree(building, ignore_errors=True)
    # A venv's scripts name its own path: the rename needs the console script rewritten.
    _fix_shebangs(venv, building)
    _remove_stale(cache, keep=venv)
    return venv


def _remove_stale(cache: Path, keep: Path, idle_s: float = 3600) -> None:
    """Delete venvs of older agent versions (about 300 MB each) unused for an hour; one that
    another checkout uses right now has a fresh ``.complete`` and stays."""
    for old in cache.glob("edge-venv-*"):
        marker = old / ".complete"
        if old != keep and (not marker.exists() or time.time() - marker.stat().st_mtime > idle_s):
            shutil.rmtree(old, ignore_errors=True)


def _fix_shebangs(venv: Path, old: Path) -> None:
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(b"#!") and str(old).encode() in data:
                script.write_bytes(data.replace(str(old).encode(), str(venv).encode()))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(str(old), str(venv)))


def _agent_env() -> dict:
    """No MLflow settings and no PYTHONPATH: the agent sees only its venv and its arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _agent(venv: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["taskset", "-c", "0", str(venv / "bin" / "cars-ml-edge"), *args],
        env=_agent_env(),
        cwd=venv,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _popen(venv: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["taskset", "-c", "0", str(venv / "bin" / "cars-ml-edge"), *args],
        env=_agent_env(),
        cwd=venv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen, text: str) -> list[str]:
    """The agent's stdout lines up to the first containing ``text`` (the test's timeout
    catches an agent that never prints it)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"agent exited before {text!r}: {''.join(lines)}{proc.stderr.read()}")


def _register(
    client: MlflowClient,
    experiment_id: str,
    files: list[Path],
    seed: int,
    recorded: list[Path] | None = None,
) -> str:
    """A run with ``files`` as ``tflite/`` artifacts, registered as the model's next version.

    The run records each file's SHA-256 as training does, of ``recorded`` (default: ``files``;
    empty: no record).
    """
    run = client.create_run(experiment_id, run_name=f"colour-net-{seed}")
    client.log_param(run.info.run_id, "model", "colour-net")
    for path in files if recorded is None else recorded:
        kind = "int8" if "int8" in path.name else "float32"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        client.set_tag(run.info.run_id, f"tflite_{kind}_sha256", digest)
    for path in files:
        client.log_artifact(run.info.run_id, str(path), "tflite")
    client.set_terminated(run.info.run_id)
    source = f"{run.info.artifact_uri}/tflite"
    # Registered as training registers a version: with the current serving code's record.
    current = {SERVING_CODE_TAG: str(SERVING_CODE_VERSION)}
    version = client.create_model_version(MODEL, source, run_id=run.info.run_id, tags=current)
    return version.version


def _tflite_pair(workdir: Path, seed: int) -> list[Path]:
    from serving_helpers import colour_classifier

    from cars_ml.export.tflite import export_tflite

    model, _ = colour_classifier(seed=seed)
    paths = export_tflite(model, workdir / f"seed{seed}", colour_images(40, seed)[0])
    return [paths["float32"], paths["int8"]]


def test_venv_has_no_tensorflow_and_refuses_bad_arguments(edge_venv):
    python = str(edge_venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    # Run from outside the repository, where ``python -c`` would find cars_ml in the cwd.
    probe = subprocess.run(
        [python, "-c", "import cars_ml"], capture_output=True, env=_agent_env(), cwd=edge_venv
    )
    assert probe.returncode != 0
    bad = _agent(edge_venv, "--tracking-uri", "http://x", "--device", "Pi 5", timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "device name" in bad.stderr, bad.stderr


def test_unreachable_server_is_one_line_naming_it(edge_venv):
    uri = f"http://admin:hunter2secret@127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = _agent(edge_venv, "--tracking-uri", uri, "--device", DEVICE, "--once", timeout=120)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - start < 60
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot reach the tracking server" in lines[0]
    assert "hunter2secret" not in result.stderr + result.stdout and "admin:***@" in lines[0]


class _Refuses(http.server.BaseHTTPRequestHandler):
    """A server behind basic auth that accepts nobody."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.end_headers()
        self.wfile.write(b"You are not authenticated.")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_refused_credentials_are_one_line_naming_the_variables(edge_venv):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        result = _agent(edge_venv, "--tracking-uri", uri, "--device", DEVICE, timeout=120)
    finally:
        server.shutdown()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "Traceback" not in result.stderr


def test_agent_measures_registered_versions_on_sim_1core(edge_venv, tmp_path):
    with sqlite_tracking_server(tmp_path / "server") as server:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        experiment_id = client.create_experiment("edge-e2e")
        client.create_registered_model(MODEL)
        versions = [
            _register(client, experiment_id, _tflite_pair(tmp_path, seed), seed) for seed in (0, 1)
        ]

        photos = tmp_path / "photos"
        photos.mkdir()
        for i, image in enumerate(colour_images(6, seed=7, size=48)[0]):
            Image.fromarray(image).save(photos / f"car{i}.png")
        (photos / "notes.txt").write_text("not a photo")

        command = ["--tracking-uri", server.uri, "--device", DEVICE, "--once", "--runs", "20"]
        first = _agent(edge_venv, *command, "--images", str(photos))
        print(first.stdout)  # The progress a user sees (pytest -s).
        assert first.returncode == 0, first.stdout + first.stderr
        assert "Traceback" not in first.stderr
        assert "[1/2]" in first.stdout and "[2/2]" in first.stdout, first.stdout
        assert "calibrating device profile" in first.stdout

        for number in versions:
            mv = client.get_model_version(MODEL, number)
            metrics = client.get_run(mv.run_id).data.metrics
            for precision in ("float32", "int8"):
                p50, p95, p99 = (
                    metrics[f"{P}_{precision}_latency_ms_{q}"] for q in ("p50", "p95", "p99")
                )
                assert 0 < p50 <= p95 <= p99
                assert metrics[f"{P}_{precision}_latency_ms_p95_t1"] == p95
                assert metrics[f"{P}_{precision}_load_ms"] > 0
                assert metrics[f"{P}_{precision}_peak_rss_mb"] > 0
            assert 0 <= metrics[f"{P}_int8_agreement"] <= 1 and metrics[f"{P}_images"] == 6
            tags = mv.tags
            assert float(tags[f"device.{DEVICE}.int8_latency_ms_p95"]) > 0
            assert float(tags[f"device.{DEVICE}.float32_latency_ms_p95"]) > 0
            assert tags[f"device.{DEVICE}.threads"] == "1"
            assert '"cores": 1' in tags[f"device.{DEVICE}.facts"]  # The taskset pin shows.
            assert tags[f"device.{DEVICE}.measured_at"].endswith("Z")
            assert f"device.{DEVICE}.facts" in client.get_run(mv.run_id).data.tags

        devices = client.get_experiment_by_name("cars-ml-devices")
        (profile,) = client.search_runs([devices.experiment_id], f"tags.device = '{DEVICE}'")
        assert profile.info.run_name == DEVICE
        for key in (
            "peak_float32_gmacs",
            "peak_int8_gmacs",
            "peak_float32_gmacs_t1",
            "peak_int8_gmacs_t1",
        ):
            assert profile.data.metrics[key] > 0

        recalibrated = _agent(
            edge_venv, "--tracking-uri", server.uri, "--device", DEVICE, "--calibrate"
        )
        assert recalibrated.returncode == 0 and "calibrating" in recalibrated.stdout
        assert "measuring" not in recalibrated.stdout
        history = client.get_metric_history(profile.info.run_id, "peak_int8_gmacs_t1")
        assert len(history) == 2

        again = _agent(edge_venv, "--tracking-uri", server.uri, "--device", DEVICE, "--once")
        assert again.returncode == 0, again.stderr
        assert "nothing to measure" in again.stdout and "calibrating" not in again.stdout

        bare = client.create_run(experiment_id, run_name="no-export")
        notes = tmp_path / "notes.txt"
        notes.write_text("trained with export_tflite=false\n")
        client.log_artifact(bare.info.run_id, str(notes))
        client.set_terminated(bare.info.run_id)
        skipped = client.create_model_version(
            MODEL, bare.info.artifact_uri, run_id=bare.info.run_id
        )
        garbage = tmp_path / "garbage"
        garbage.mkdir()
        for name in ("model_float32.tflite", "model_int8.tflite"):
            (garbage / name).write_bytes(b"not a flatbuffer" * 64)
        broken = _register(client, experiment_id, sorted(garbage.iterdir()), seed=9)
        # Files the server hands out that are not what training recorded, or too large.
        good = sorted((tmp_path / "seed0").glob("*.tflite"))
        tampered = _register(client, experiment_id, sorted(garbage.iterdir()), 10, good)
        unrecorded = _register(client, experiment_id, good, 11, recorded=[])
        large = tmp_path / "large"
        large.mkdir()
        for name in ("model_float32.tflite", "model_int8.tflite"):
            (large / name).write_bytes(bytes(2 * 10**6))
        oversized = _register(client, experiment_id, sorted(large.iterdir()), 12)
        third = _agent(
            edge_venv, "--tracking-uri", server.uri, "--device", DEVICE, "--once",
            "--max-file-mb", "1",
        )  # fmt: skip
        assert third.returncode == 0, third.stderr
        assert f"version {tampered}: refused: tflite/model_float32.tflite has SHA-256" in (
            third.stdout
        )
        assert "not the" in third.stdout and "the file changed after training" in third.stdout
        assert f"version {unrecorded}: refused: its training run recorded no SHA-256" in (
            third.stdout
        )
        assert f"version {oversized}: refused: tflite/model_float32.tflite is 2.0 MB" in (
            third.stdout
        )
        assert (
            f"version {skipped.version}: no tflite artifacts (train with "
            "export_tflite=true); skipped"
        ) in third.stdout
        assert f"version {broken} (colour-net): a tflite file does not load" in third.stdout
        assert "Traceback" not in third.stdout + third.stderr
        for number in (skipped.version, broken, tampered, unrecorded, oversized):
            tags = client.get_model_version(MODEL, number).tags
            assert f"device.{DEVICE}.measured_at" not in tags

        # --watch: a version registered while it polls is measured; the skipped ones are
        # reported once, not at every poll; SIGTERM between versions ends it with 143.
        watcher = _popen(
            edge_venv,
            "--tracking-uri",
            server.uri,
            "--device",
            DEVICE,
            "--watch",
            "--interval",
            "1",
            "--runs",
            "20",
        )
        try:
            lines = _read_until(watcher, "watching")
            newest = _register(
                client, experiment_id, sorted((tmp_path / "seed0").glob("*.tflite")), 0
            )
            lines += _read_until(watcher, f"version {newest} (colour-net): int8 p95")
            time.sleep(2.5)  # Two more polls, with nothing new.
            watcher.send_signal(signal.SIGTERM)
            rest, err = watcher.communicate(timeout=60)
        finally:
            watcher.kill()
        assert watcher.returncode == 143, err
        output = "".join(lines) + rest
        assert output.count("no tflite artifacts") == 1 and "does not load" in output, output
        assert f"device.{DEVICE}.measured_at" in client.get_model_version(MODEL, newest).tags

        # SIGTERM while measuring: exit 143, and nothing of the interrupted measurement is logged.
        run_id = client.get_model_version(MODEL, versions[0]).run_id
        proc = _popen(
            edge_venv,
            "--tracking-uri",
            server.uri,
            "--device",
            DEVICE,
            "--versions",
            versions[0],
            "--runs",
            "10000000",
        )
        try:
            _read_until(proc, "measuring")
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 143, err
        assert "stopped by SIGTERM" in err and "Traceback" not in err
        history = client.get_metric_history(run_id, f"{P}_int8_latency_ms_p95")
        assert len(history) == 1


def test_promote_on_a_device_decides_by_what_the_agent_measured_there(edge_venv, tmp_path):
    """Three versions, the best of them never measured on ``sim-1core``: ``promote -P
    device=sim-1core`` rules it out with the reason and promotes the best measured one; with
    ``allow_estimates`` the profile's estimate stands in for the missing measurement."""
    from e2e_utils import run_entry

    with sqlite_tracking_server(tmp_path / "server") as server:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        experiment_id = client.create_experiment("edge-promote")
        client.create_registered_model(MODEL)
        pair = _tflite_pair(tmp_path, 0)
        versions = [_register(client, experiment_id, pair, seed) for seed in (0, 1, 2)]
        for number, f1 in zip(versions, (0.80, 0.85, 0.95), strict=True):
            run_id = client.get_model_version(MODEL, number).run_id
            training = {
                "test_f1_macro": f1,
                "latency_ms_p95": 5.0,
                "model_size_mb": 1.0,
                "int8_f1_drop": 0.0,
                # What a train run logs for estimates: the host's int8 latency and peak.
                "tflite_int8_latency_ms_p50": 0.01,
                "host_peak_int8_gmacs": 100.0,
            }
            for key, value in training.items():
                client.log_metric(run_id, key, value)
        measured = _agent(
            edge_venv,
            *("--tracking-uri", server.uri, "--device", DEVICE, "--once", "--runs", "20"),
            *("--versions", f"{versions[0]},{versions[1]}"),
        )
        assert measured.returncode == 0, measured.stdout + measured.stderr

        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        device = ("--device", DEVICE, "--max_device_latency_ms", "50")
        promoted = run_entry("promote", *device, env=env)
        out = promoted.stdout + promoted.stderr
        champion = client.get_model_version_by_alias(MODEL, "champion").version
        assert champion == versions[1], out
        assert f"not measured on {DEVICE}: run the edge agent there" in out
        reason = client.get_model_version(MODEL, champion).tags["promotion_reason"]
        assert f"p95 on {DEVICE} (int8)" in reason and "measured" in reason

        estimated = run_entry("promote", *device, "--allow_estimates", "true", env=env)
        champion = client.get_model_version_by_alias(MODEL, "champion").version
        assert champion == versions[2], estimated.stdout + estimated.stderr
        reason = client.get_model_version(MODEL, champion).tags["promotion_reason"]
        assert "estimated" in reason, reason
