"""Helpers for end-to-end tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_entry(
    script: str, *args: str, env: dict, timeout: float = 600, check: bool = True, cwd=None
):
    """Run ``entrypoints/<script>.py`` as a real subprocess; returns the CompletedProcess.

    The child runs in ``cwd``, by default the test's working directory (``tracking_uri`` makes
    it the test's folder), as a user runs it from theirs: a store the child creates keeps its
    ``./mlruns`` artifacts there, not in the repository.
    """
    command = [str(ROOT / "entrypoints" / f"{script}.py"), *args]
    return _run(command, script, env=env, cwd=cwd, timeout=timeout, check=check)


def _run(command: list[str], what: str, *, env: dict, cwd=None, timeout: float = 600, check=True):
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def tiny_pipeline_args(models: str = "mobilenet,vgg16", n_trials: int = 2) -> list[str]:
    """``main`` arguments for the smallest real pipeline: one epoch of 32 px images from scratch,
    8 images per class, ``n_trials`` tuning trials per backbone."""
    return [
        *("--models", models, "--n_trials", str(n_trials)),
        *("--max_epochs", "1", "--epochs", "1", "--fine_tune_epochs", "0"),
        *("--image_size", "32", "--weights", "none", "--max_per_class", "8"),
    ]


def mlflow_run(entry: str, params: list[str] | dict[str, str], *, env: dict, cwd=None, **kw):
    """``mlflow run <repository> -e <entry> --env-manager local -P name=value ...`` as a user
    runs it: MLflow creates the run, renders the MLproject command and starts the entry point.

    ``params`` is a dict or the entry point's own flags (``["--models", "mobilenet", ...]``);
    ``kw`` as for ``run_entry`` (``timeout``, ``check``).
    """
    if isinstance(params, list):
        names, values = params[::2], params[1::2]
        if len(names) != len(values) or not all(n.startswith("--") for n in names):
            raise ValueError(f"flags and values must alternate: {params}")
        params = {n.removeprefix("--"): v for n, v in zip(names, values, strict=True)}
    command = ["-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    return _run(command, f"mlflow run -e {entry}", env=env, cwd=cwd, **kw)
