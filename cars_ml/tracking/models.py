"""Models: log a pyfunc model, register, resolve, load and download model versions.

What the serving model consists of is ``cars_ml.serving.package``'s business; this module only
logs, saves and registers what it is given, so tracking imports no stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

import cars_ml
from cars_ml.tracking.descriptions import model_description, version_description
from cars_ml.tracking.redaction import redact
from cars_ml.tracking.runs import base_tags, tracking_uri

log = logging.getLogger(__name__)

# --- Models: log, register, load ---------------------------------------


def log_pyfunc_model(files: Mapping[str, Any], name: str = "model"):
    """Log a pyfunc model in the active run from ``files``, the keyword arguments of
    ``mlflow.pyfunc.log_model`` (``cars_ml.serving.package.serving_model`` writes the serving
    model's); returns MLflow's ModelInfo."""
    if mlflow.active_run() is None:
        raise ValueError("log_pyfunc_model needs an active run; call it inside start_run().")
    return mlflow.pyfunc.log_model(name=name, **files)


def register_model(
    model_uri: str,
    name: str,
    tags: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
):
    """Register ``model_uri`` as a new version of ``name``, tag it and describe it (and the
    model, when it has no description yet); returns the ModelVersion."""
    version = mlflow.register_model(model_uri, name)
    client = mlflow.MlflowClient()
    tags = {**(tags or {}), cars_ml.SERVING_CODE_TAG: cars_ml.SERVING_CODE_VERSION}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, redact(value)[:5000])
    row = {**(metrics or {}), "backbone": tags.get("backbone")}
    text = version_description(row, {k: str(v) for k, v in tags.items()}, champion=False)
    client.update_model_version(name, version.version, description=text)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description(name, None, ""))
    return client.get_model_version(name, version.version)


def load_pyfunc(model_uri: str):
    """Load a logged or registered pyfunc model (``models:/name@alias``, ``runs:/...``, a path)."""
    return mlflow.pyfunc.load_model(model_uri)


def check_model_uri(model_uri: str) -> None:
    """Fail fast with a clear message when a ``models:/name@alias`` URI does not resolve."""
    match = re.fullmatch(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)", model_uri)
    if not match:
        return
    client = mlflow.MlflowClient()
    try:
        client.get_model_version_by_alias(match["name"], match["alias"])
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(
            f"{model_uri} does not resolve at {redact(tracking_uri())}: {exc.message}. Train and "
            "register a model, run `mlflow run . -e promote` to set the alias, or pass model_uri."
        ) from exc


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model version resolved from a ``models:/`` URI, and where it was trained."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))")


def resolve_model_version(model_uri: str) -> RegisteredModel:
    """``models:/name/<version>`` or ``models:/name@alias`` -> the version, its tags and its
    training run's metrics; a URI that resolves to nothing fails with the fix."""
    match = _MODEL_URI.fullmatch(model_uri.strip())
    if not match:
        raise ValueError(
            f"teacher={model_uri!r} is not a registered model URI; pass "
            f"models:/{cars_ml.REGISTERED_MODEL_NAME}/<version> or models:/<name>@<alias>."
        )
    client = mlflow.MlflowClient()
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            mv = client.get_model_version(match["name"], match["version"])
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(
            f"{model_uri} does not resolve at {redact(tracking_uri())}: {exc.message} List the "
            f"versions in the MLflow UI (Models) or train one with `mlflow run . -e train`."
        ) from exc
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return RegisteredModel(mv.name, str(mv.version), mv.run_id or "", dict(mv.tags), metrics)


def check_serving_code(model_uri: str, allow_old: bool = False) -> None:
    """Refuse a registered version whose serving code is older than this release's minimum
    (``cars_ml.MIN_SERVING_CODE_VERSION``); with ``allow_old`` warn instead. URIs that name no
    registered version (``runs:/``, paths) carry no record and are not checked."""
    if not _MODEL_URI.fullmatch(model_uri.strip()):
        return
    version = resolve_model_version(model_uri)
    found = cars_ml.serving_code_version(version.tags)
    if found >= cars_ml.MIN_SERVING_CODE_VERSION:
        return
    what = (
        f"{model_uri} (version {version.version}) carries serving code {found}, older than the "
        f"minimum {cars_ml.MIN_SERVING_CODE_VERSION} of this release: its request guard and "
        "limits lack fixes"
    )
    if not allow_old:
        raise ValueError(f"{what}. To serve it, {cars_ml.OLD_SERVING_CODE_FIX}.")
    log.warning("%s; serving it anyway (allow_old_serving_code=true).", what)


def download_model(model_uri: str, dst: str | Path) -> Path:
    """Download a logged model's files (``MLmodel``, ``artifacts/``) into ``dst``."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


# --- Benchmark: a throwaway registry for serving a freshly built model (owner: perf) ----------


def register_in_scratch_store(
    files: Mapping[str, Any], folder: str | Path, *, name: str = "benchmark-model"
) -> tuple[str, str, str]:
    """Save the pyfunc model of ``files`` (the keyword arguments of ``mlflow.pyfunc.save_model``)
    and register it in a new SQLite store in ``folder``.

    Only an explicit client touches the scratch store: the tracking URI, the active run and the
    experiment in force are left alone, so it can be called while a benchmark run is open.
    Returns ``(tracking_uri, model_uri, local_model_path)``: serve ``model_uri`` with
    ``MLFLOW_TRACKING_URI=tracking_uri``; load ``local_model_path`` in this process.
    """
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Artifacts go beside the database, never into ./mlruns of the working directory.
    experiment_id = client.create_experiment(
        "scratch", artifact_location=(root / "artifacts").as_uri()
    )
    run = client.create_run(experiment_id, run_name="scratch-model", tags=base_tags())
    local = root / "model"
    mlflow.pyfunc.save_model(path=str(local), **files)
    client.log_artifacts(run.info.run_id, str(local), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name,
        f"{run.info.artifact_uri}/model",
        run.info.run_id,
        tags={cars_ml.SERVING_CODE_TAG: str(cars_ml.SERVING_CODE_VERSION)},
    )
    return uri, f"models:/{name}/{version.version}", str(local)
