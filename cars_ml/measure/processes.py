"""Child servers in their own process group: a free port, start one, stop the whole group.

Written once for the benchmark's ``mlflow models serve`` and for the tests' servers: the MLflow
CLI starts workers (uvicorn, gunicorn) of its own, so only stopping the group stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it if it lingers, and any straggler after."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    # Workers of the group may outlive the leader; make sure none is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def process_group(
    command: list[str], env: dict, log_path: str | Path, cwd: str | Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own session, output to ``log_path``; stop the whole group after."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_group(proc)
