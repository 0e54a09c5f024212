"""How long an entry point needs just to start here, to tell a fast failure from a hang.

Entry points import TensorFlow and MLflow before they can check anything, which on a loaded
2-core machine alone takes 5-20 s; a failure is "fast" when it costs little more than that
start-up, and never MLflow's ~100 s of database retries or any training.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

from e2e_utils import ROOT


@functools.cache
def startup_seconds(entry: str) -> float:
    """Wall time of ``python entrypoints/<entry>.py --help`` (all imports, no work)."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / f"{entry}.py"), "--help"],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    return time.monotonic() - started


def assert_fails_fast(entry: str, elapsed_s: float) -> None:
    """``elapsed_s`` is within ~15 s, or twice the start-up time plus 5 s on a loaded machine."""
    limit = max(15.0, 2 * startup_seconds(entry) + 5.0)
    assert elapsed_s < limit, f"{entry} took {elapsed_s:.1f}s to fail (limit {limit:.1f}s)"
