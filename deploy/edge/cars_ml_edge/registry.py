"""The agent's side of MLflow: find versions to measure, download their files, log results.

Names written (a contract other parts of cars-ml read; see deploy/edge/README.md):

On the version's training run, in ONE ``log_batch`` per version, after all measuring:
  ``device_<name>_<P>_latency_ms_{p50,p95,p99}``, ``device_<name>_<P>_load_ms``,
  ``device_<name>_<P>_peak_rss_mb`` for P in (float32, int8) at the first thread count;
  ``device_<name>_<P>_latency_ms_{p50,p95,p99}_t<T>`` for every thread count T;
  with images: ``device_<name>_int8_agreement`` and ``device_<name>_images``;
  and the run tag ``device.<name>.facts``.
Model-version tags, after the metrics: ``device.<name>.int8_latency_ms_p95``,
  ``device.<name>.float32_latency_ms_p95``, ``device.<name>.threads``,
  ``device.<name>.facts`` (JSON) and LAST the marker ``device.<name>.measured_at`` (ISO UTC).
  Only a version with the marker counts as measured on the device.
Device profile: run ``<name>`` (tag ``device=<name>``) in experiment ``cars-ml-devices`` with
  ``peak_{float32,int8}_gmacs_t<T>`` per thread count, un-suffixed ``peak_{float32,int8}_gmacs``
  for the first, and the facts as tags.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

MODEL_NAME = "stanford-cars-classifier"
DEVICES_EXPERIMENT = "cars-ml-devices"
FILES = {"float32": "tflite/model_float32.tflite", "int8": "tflite/model_int8.tflite"}
# The training run's record of each file's SHA-256 (cars_ml.training.run._export).
SHA256_TAGS = {"float32": "tflite_float32_sha256", "int8": "tflite_int8_sha256"}


class Refused(ValueError):
    """A version's files are not loaded: too large, or not the bytes its training recorded."""


def marker(device: str) -> str:
    return f"device.{device}.measured_at"


@dataclass(frozen=True)
class Version:
    version: int
    run_id: str
    tags: dict


def versions_to_measure(client: MlflowClient, model: str, device: str, only: list[int] | None):
    """Newest first: exactly ``only`` when given (measured again), else every version without
    this device's marker."""
    found = [
        Version(int(v.version), v.run_id, dict(v.tags or {}))
        for v in client.search_model_versions(f"name='{model}'")
    ]
    found.sort(key=lambda v: v.version, reverse=True)
    if only is not None:
        missing = sorted(set(only) - {v.version for v in found})
        if missing:
            raise LookupError(f"model {model!r} has no version {', '.join(map(str, missing))}")
        return [v for v in found if v.version in only]
    return [v for v in found if marker(device) not in v.tags]


def architecture(client: MlflowClient, run_id: str) -> str:
    """The run's ``model`` parameter (the backbone), else its run name."""
    run = client.get_run(run_id)
    return run.data.params.get("model") or run.info.run_name or run_id[:8]


def download(
    client: MlflowClient, run_id: str, dst: Path, max_bytes: int
) -> dict[str, Path] | None:
    """The run's float32 and int8 files, or None when it has not both; ``Refused`` for a file
    over ``max_bytes`` (checked before downloading) or whose SHA-256 is not the one its training
    run recorded (checked before anything loads it)."""
    listed = {info.path: info for info in client.list_artifacts(run_id, "tflite")}
    if not set(FILES.values()) <= set(listed):
        return None
    for path in FILES.values():
        size = listed[path].file_size or 0
        if size > max_bytes:
            raise Refused(
                f"{path} is {size / 1e6:.1f} MB, over --max-file-mb {max_bytes / 1e6:.0f}"
            )
    recorded = client.get_run(run_id).data.tags
    files = {}
    for precision, path in FILES.items():
        expected = recorded.get(SHA256_TAGS[precision])
        if not expected:
            raise Refused(
                f"its training run recorded no SHA-256 for {path} (registered before the agent "
                "checked files); train it again to measure it"
            )
        files[precision] = Path(client.download_artifacts(run_id, path, str(dst)))
        with open(files[precision], "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != expected:
            raise Refused(
                f"{path} has SHA-256 {actual[:12]}..., not the {expected[:12]}... its training "
                "run recorded: the file changed after training"
            )
    return files


def log_measurement(
    client: MlflowClient,
    model: str,
    version: Version,
    device: str,
    metrics: dict[str, float],
    threads: int,
    facts: str,
) -> None:
    """Metrics and the facts run tag in one batch, then the version's tags, the marker last."""
    now = int(time.time() * 1000)
    client.log_batch(
        version.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in sorted(metrics.items())],
        tags=[RunTag(f"device.{device}.facts", facts)],
    )
    tags = {
        f"device.{device}.int8_latency_ms_p95": f"{metrics[f'device_{device}_int8_latency_ms_p95']:.4g}",
        f"device.{device}.float32_latency_ms_p95": f"{metrics[f'device_{device}_float32_latency_ms_p95']:.4g}",
        f"device.{device}.threads": str(threads),
        f"device.{device}.facts": facts,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model, str(version.version), key, value)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.set_model_version_tag(model, str(version.version), marker(device), stamp)


def profile(client: MlflowClient, device: str):
    """The device's profile run in ``cars-ml-devices``, or None."""
    experiment = client.get_experiment_by_name(DEVICES_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.device = '{device}'", max_results=1
    )
    return runs[0] if runs else None


def store_profile(client: MlflowClient, device: str, metrics: dict[str, float], facts: str):
    """Write the profile into the device's one run, creating the experiment and run if needed."""
    run = profile(client, device)
    if run is None:
        experiment = client.get_experiment_by_name(DEVICES_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(DEVICES_EXPERIMENT)
        )
        run = client.create_run(experiment_id, run_name=device, tags={"device": device})
    now = int(time.time() * 1000)
    tags = {f"facts.{key}": str(value) for key, value in json.loads(facts).items()}
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in sorted(metrics.items())],
        tags=[RunTag("facts", facts), *(RunTag(k, v) for k, v in tags.items())],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id
