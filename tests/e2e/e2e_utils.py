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
    proc = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / f"{script}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
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
