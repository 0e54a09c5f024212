"""How long an entry point needs just to start here, to tell a fast failure from a hang.

Entry points import TensorFlow and MLflow before they can check anything, which on a loaded
2-core machine alone takes 5-20 s, and a fresh SQLite store adds its schema migrations. The bound
is a hang detector, not a speed goal: it tells a failure that costs about a start-up from
MLflow's ~100 s of connection retries. Whether any work started is asserted on the outcome
(test_bad_params finds not one MLflow run in the store), never by the clock.
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
    """``elapsed_s`` is under 45 s, or three start-ups plus 10 s where start-up alone is slow.

    The start-up is measured once, at another moment than the failing run, and the suite runs
    beside a second pytest worker: the margin absorbs that, and stays well under the retries.
    """
    limit = max(45.0, 3 * startup_seconds(entry) + 10.0)
    assert elapsed_s < limit, f"{entry} took {elapsed_s:.1f}s to fail (limit {limit:.1f}s)"
