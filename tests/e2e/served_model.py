"""A real ``mlflow models serve`` of a registered champion, shared by the hostile-request and
load tests, plus raw HTTP and memory helpers.

The model is ``serving_helpers.colour_classifier`` (learns red/green/blue in seconds), so a good
request has a known right answer. Registration reuses ``serving_helpers.register_champion`` and
the process handling reuses ``servers.process_group`` (the whole process group is killed after).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from servers import free_port, process_group, wait_http
from serving_helpers import colour_classifier, colour_images, register_champion

MODEL_URI = "models:/stanford-cars-classifier@champion"
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Served:
    port: int
    pid: int  # the `mlflow models serve` CLI; uvicorn runs as its child
    class_names: tuple[str, ...]
    log_path: Path

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists() and _state(self.pid) != "Z"


@contextlib.contextmanager
def served_champion(workdir: Path) -> Iterator[Served]:
    """Train the colour classifier, register it as champion in a fresh SQLite store, serve it."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    old_cwd = Path.cwd()
    mp = pytest.MonkeyPatch()
    try:
        # Artifacts of a SQLite store default to ./mlruns: keep them in this folder.
        mp.chdir(workdir)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        model, names = colour_classifier()
        register_champion(model, names, size=model.input_shape[1])
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI,
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        log_path = workdir / "server.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        with process_group(command, env, log_path) as proc:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, log_path, timeout_s=START_TIMEOUT_S)
            yield Served(port, proc.pid, tuple(names), log_path)
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()
        os.chdir(old_cwd)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body)

    @property
    def message(self) -> str:
        """The error message of an MLflow error body, else the raw text."""
        try:
            return str(self.json().get("message", self.text))
        except (ValueError, AttributeError):
            return self.text


def post(
    port: int,
    body: bytes | str | dict | list,
    content_type: str | None = "application/json",
    timeout: float = 120,
) -> Reply:
    """POST ``body`` to /invocations over a raw connection (``content_type=None`` sends none)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", "/invocations")
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        conn.send(data)
        response = conn.getresponse()
        return Reply(response.status, response.read())
    finally:
        conn.close()


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def colour_png(index: int, seed: int = 0, size: int = 32) -> tuple[str, int]:
    """A base64 PNG of one noisy solid-colour image and its true class id (red, green, blue)."""
    images, labels = colour_images(index + 1, seed, size)
    return b64(encode(Image.fromarray(images[index]))), int(labels[index])


def solid_png(rgb: tuple[int, int, int], size: int = 32) -> str:
    return b64(encode(Image.new("RGB", (size, size), rgb)))


def images_request(values: list) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return "gone"
    return "?"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc; psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            # The command name may contain spaces; fields after its closing ')' are fixed.
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of ``pid`` and its descendants, in MB."""
    total_kb = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def label_of(reply: Reply) -> list[str]:
    return [p["label"] for p in reply.json()["predictions"]]


def assert_valid_prediction(reply: Reply, class_names, n: int) -> None:
    assert reply.status == 200, (reply.status, reply.text[:500])
    predictions = reply.json()["predictions"]
    assert len(predictions) == n
    for prediction in predictions:
        assert prediction["label"] in class_names
        assert class_names[prediction["class_id"]] == prediction["label"]
        assert 0.0 <= prediction["probability"] <= 1.0
        assert np.isfinite(prediction["probability"])
