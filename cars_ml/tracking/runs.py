"""Runs: start and end them, log params, metrics, tags and artifacts, find finished ones.

It respects what ``mlflow run`` hands over (``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``,
``MLFLOW_EXPERIMENT_ID``), checks the tracking server answers before any work starts, and
scrubs secrets from everything it logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

import cars_ml
from cars_ml.tracking.redaction import redact

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """The tracking URI in force (``MLFLOW_TRACKING_URI`` or MLflow's default)."""
    return mlflow.get_tracking_uri()


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """Fail within seconds, naming the URI, when the tracking server or database does not answer
    or refuses our credentials (see :mod:`cars_ml.tracking.check`)."""
    from cars_ml.tracking.check import check_reachable

    check_reachable(tracking_uri(), timeout_s)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def base_tags() -> dict[str, str]:
    """Tags every run carries: package version and git commit."""
    return {"cars_ml_version": cars_ml.__version__, "git_commit": _git_commit()}


def use_experiment(name: str | None) -> None:
    """Select an experiment by name unless ``mlflow run`` already chose one for us.

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) calling ``set_experiment`` conflicts with the
    run it created, so the experiment is left alone; use ``mlflow run --experiment-name``.
    """
    if name and not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(name)


# MLflow 3's UI opens an experiment on its GenAI overview ("Traces") unless this tag says the
# experiment trains models; then it opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"


def mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training, unless it already says what kind it is."""
    client = mlflow.MlflowClient()
    try:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    # The tag only changes where the UI opens: a store that refuses it still runs.
    except mlflow.exceptions.MlflowException as exc:
        log.warning("experiment %s not tagged as training: %s", experiment_id, exc.message)


def ui_base() -> str:
    """The MLflow UI's address: the tracking server itself, else where ``mlflow ui`` listens."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def ui_links(experiment_id: str, run_id: str, model_name: str) -> dict[str, str]:
    """Direct UI links: the run, the list of its child runs (to compare), the registered model."""
    from urllib.parse import quote

    base = ui_base()
    children = quote(f"tags.mlflow.parentRunId = '{run_id}'", safe="")
    return {
        "run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
        "children": f"{base}/#/experiments/{experiment_id}/runs?searchFilter={children}",
        "model": f"{base}/#/models/{quote(model_name, safe='')}",
    }


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    *,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) a run; it ends FAILED if the body raises.

    A top-level run picks up ``MLFLOW_RUN_ID`` when ``mlflow run`` set it. ``KeyboardInterrupt``
    ends the run KILLED.
    """
    active = mlflow.active_run()
    resume_env = not nested and active is None and os.environ.get("MLFLOW_RUN_ID")
    # A step started while another run is active (the pipeline) becomes its child run.
    nested = active is not None or parent_run_id is not None
    # A child started in another process (a pipeline worker) goes where its parent is.
    experiment_id = None
    if parent_run_id and active is None:
        experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    run = mlflow.start_run(
        run_name=None if resume_env else run_name,
        nested=nested,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        tags={**base_tags(), **{k: redact(v) for k, v in (tags or {}).items()}},
    )
    if resume_env and run_name:
        mlflow.set_tag("mlflow.runName", run_name)
    if not nested:
        mark_training_experiment(run.info.experiment_id)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", redact(f"{type(exc).__name__}: {exc}")[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_params(params: Mapping[str, Any]) -> None:
    """Log params (stringified, secrets scrubbed).

    ``mlflow run`` has already logged the MLproject parameters as the user typed them; MLflow
    forbids changing a param, so keys already on the run keep that value, and a value the step
    resolved differently (``preset=auto`` that became ``cpu``) is logged as ``<name>_used``.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {}
    for key, value in params.items():
        text = redact(value)[:6000]
        if key not in existing:
            fresh[key] = text
        elif f"{key}_used" not in existing and not _same_param(existing[key], text):
            fresh[f"{key}_used"] = text
    if fresh:
        mlflow.log_params(fresh)


def _same_param(typed: str, logged: str) -> bool:
    """Whether two param strings say the same value: ``5`` and ``5.0``, ``none`` and ``None``."""
    if typed.strip().lower() == logged.strip().lower():
        return True
    try:
        return float(typed) == float(logged)
    except ValueError:
        return False


def log_metrics(
    metrics: Mapping[str, float],
    step: int | None = None,
    *,
    model_id: str | None = None,
    dataset: Any = None,
) -> None:
    """Log finite numeric metrics; ``None`` values are skipped.

    ``model_id`` (a logged model's, ``ModelInfo.model_id``) links them to that model too, and
    ``dataset`` (from :func:`log_dataset`) says what they were measured on: MLflow 3's model
    view lists them.
    """
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id, dataset=dataset)


# MLflow keeps a dataset digest of at most 36 characters; the full fingerprint is an input tag.
DIGEST_LENGTH = 36


def log_dataset(frame, *, name: str, source: str, fingerprint: str, context: str):
    """Log ``frame`` (one row per image) as an MLflow dataset input of the active run.

    The digest is the dataset fingerprint (cut to MLflow's 36 characters; the whole one is the
    input tag ``fingerprint``) and ``context`` is ``training``, ``validation`` or ``test``.
    Returns the dataset, for :func:`log_metrics`'s ``dataset``.
    """
    import warnings

    with warnings.catch_warnings():  # "synthetic" is no URI MLflow knows; it is kept as given
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(
            frame, source=redact(source), name=name, digest=fingerprint[:DIGEST_LENGTH]
        )
    mlflow.log_input(dataset, context=context, tags={"fingerprint": fingerprint})
    return dataset


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: redact(v)[:5000] for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def log_figure(figure, artifact_file: str) -> None:
    """Log a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_table(frame, name: str, artifact_path: str | None = None) -> None:
    """Log a DataFrame as ``name.csv`` and ``name.html`` artifacts, secrets scrubbed.

    Text cells and column names go through :func:`redact`; numbers are left as they are. The
    caller's frame is not changed.
    """
    frame = frame.rename(columns=lambda c: redact(c) if isinstance(c, str) else c)
    frame = frame.map(lambda v: redact(v) if isinstance(v, str) else v)
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / f"{name}.csv", index=False)
        (Path(tmp) / f"{name}.html").write_text(frame.to_html(index=False, na_rep="-"))
        mlflow.log_artifacts(tmp, artifact_path=artifact_path)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_text(redact(json.dumps(data, indent=2, default=str)), artifact_file)


def close_stale_runs(run_ids, status: str = "KILLED") -> list[str]:
    """End runs left RUNNING by a killed process (e.g. a tuning worker); returns those closed."""
    client = mlflow.MlflowClient()
    closed = []
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "error", "worker died; closed on resume")
                client.set_terminated(run_id, status=status)
                closed.append(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("Could not close stale run %s", run_id)
    return closed


def filter_equals(key: str, value: str) -> tuple[str, bool]:
    """A filter-string clause matching ``key`` equal to ``value``, and whether it is exact.

    MLflow's search parser strips one pair of quotes from a value and never unescapes, so
    doubling a quote (``'a''b'``) or a backslash does not work. A value with single quotes is
    put in double quotes and the other way round. A value with both cannot be written exactly:
    it becomes a ``LIKE`` pattern with ``_`` (any one character) for each quote, which also
    matches look-alikes, so the clause comes back with ``exact=False`` and the caller must
    compare the results itself.
    """
    text = str(value)
    if "'" not in text:
        return f"{key} = '{text}'", True
    if '"' not in text:
        return f'{key} = "{text}"', True
    return f"{key} LIKE '{text.replace(chr(39), '_').replace(chr(34), '_')}'", False


def find_finished_run(tags: Mapping[str, str]) -> Any | None:
    """The newest FINISHED run in the current experiment carrying all ``tags`` (for reuse)."""
    clauses = [filter_equals(f"tags.`{k}`", v) for k, v in tags.items()]
    exact = all(is_exact for _, is_exact in clauses)
    runs = mlflow.search_runs(
        filter_string=" and ".join([c for c, _ in clauses] + ["attributes.status = 'FINISHED'"]),
        order_by=["attributes.start_time DESC"],
        # A loose (LIKE) match may return look-alikes first; they are filtered out below.
        max_results=1 if exact else 1000,
        output_format="list",
    )
    runs = [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]
    return runs[0] if runs else None


# --- Reliability: dead workers' runs (owner: reliability) ---------------------------------


def running_parent_runs(run_ids) -> list[str]:
    """Parents (``mlflow.parentRunId``) of ``run_ids`` that are still RUNNING, excluding the
    active run: the parent of a dead worker's trial is that dead worker's own run."""
    client = mlflow.MlflowClient()
    active = active_run_id()
    parents: list[str] = []
    for run_id in run_ids:
        try:
            parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
            fresh = parent and parent != active and parent not in parents
            if fresh and client.get_run(parent).info.status == "RUNNING":
                parents.append(parent)
        except mlflow.exceptions.MlflowException:
            log.warning("Could not look up the parent of run %s", run_id)
    return parents
