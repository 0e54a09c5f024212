"""The served endpoint: ``mlflow models serve`` under single-image requests on loopback."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cars_ml.measure.processes import free_port, process_group
from cars_ml.serving.model import PRECISION_ENV
from cars_ml.serving.run import ServeConfig, serve_command

START_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 60.0
WARMUP_REQUESTS = 10
# A run handed over by ``mlflow run`` belongs to the benchmark, never to the server process.
_RUN_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def _wait_until_up(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(
        f"mlflow models serve was not up after {START_TIMEOUT_S:.0f}s:\n{log_path.read_text()[-3000:]}"
    )


class _Client:
    """One keep-alive HTTP connection posting the same single-image request."""

    def __init__(self, port: int, body: bytes):
        self.port = port
        self.body = body
        self.conn: http.client.HTTPConnection | None = None

    def post(self) -> bool:
        """Send one request; ``True`` for a 200 answer holding one prediction."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S
                )
            self.conn.request(
                "POST", "/invocations", self.body, {"Content-Type": "application/json"}
            )
            response = self.conn.getresponse()
            payload = response.read()
            return response.status == 200 and len(json.loads(payload)["predictions"]) == 1
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            # A broken connection is counted as an error and replaced for the next request.
            self.close()
            return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def load_test(port: int, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads post back to back for ``seconds``; latency of successful requests."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        client = _Client(port, body)
        client.post()  # Opens the connection before the clock starts.
        start_gate.wait()
        while time.perf_counter() < deadline[0]:
            begin = time.perf_counter()
            ok = client.post()
            if ok:
                latencies[i].append((time.perf_counter() - begin) * 1000.0)
            else:
                errors[i] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start_gate.wait()
    for thread in threads:
        thread.join(timeout=seconds + REQUEST_TIMEOUT_S + 10)
    elapsed = time.perf_counter() - began
    done = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.array([])
    if done.size == 0:
        return {
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "req_per_s": 0.0,
            "errors": float(sum(errors)),
        }
    return {
        "p50_ms": float(np.percentile(done, 50)),
        "p99_ms": float(np.percentile(done, 99)),
        "req_per_s": done.size / elapsed,
        "errors": float(sum(errors)),
    }


def compare_serving(
    model_uri: str,
    tracking_uri: str,
    image_b64: str,
    workdir: Path,
    *,
    seconds: float = 10.0,
    clients: Sequence[int] = (1, 8),
    precision: str = "float32",
) -> dict[str, float]:
    """Serve ``model_uri`` with the ``serve`` step's command and load it from 1 and 8 clients.

    Metrics per client count ``n``, prefixed ``serve`` for one client and ``serve<n>`` otherwise
    (``serve_int8`` / ``serve<n>_int8`` for the int8 file): ``_p50_ms``, ``_p99_ms``,
    ``_req_per_s`` (successful requests) and ``_errors``.
    """
    if seconds <= 0:
        raise ValueError(f"serve seconds must be > 0, got {seconds}.")
    port = free_port()
    command = serve_command(ServeConfig(model_uri=model_uri, port=port))
    env = {k: v for k, v in os.environ.items() if k not in _RUN_ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env[PRECISION_ENV] = precision  # what `serve -P precision=...` hands the server
    suffix = "" if precision == "float32" else f"_{precision}"
    body = json.dumps({"inputs": {"image": [image_b64]}}).encode()
    log_path = Path(workdir) / f"serve{suffix}.log"
    metrics: dict[str, float] = {}
    with process_group(command, env, log_path) as proc:
        _wait_until_up(proc, port, log_path)
        warm = _Client(port, body)
        if not all([warm.post() for _ in range(WARMUP_REQUESTS)]):
            raise RuntimeError(
                f"the served model refused a valid photo:\n{log_path.read_text()[-3000:]}"
            )
        warm.close()
        for n in clients:
            prefix = ("serve" if n == 1 else f"serve{n}") + suffix
            result = load_test(port, body, n, seconds)
            metrics.update({f"{prefix}_{key}": value for key, value in result.items()})
    return metrics
