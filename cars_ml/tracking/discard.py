"""Delete the run ``mlflow run`` created for a refused entry point, once MLflow lets go of it.

``python -m cars_ml.tracking.discard <run_id>``, started detached by an entry point that refuses a
parameter holding a password (``entrypoints/_common.py``). The run cannot be deleted by the
entry point itself: after the entry point exits, ``mlflow run`` always writes the run's final
status (MLflow 3 compares the status string with integer codes, so it never sees the run as
already ended), and writing to a deleted run raises, which prints a traceback in place of our
message. So this process waits until ``mlflow run`` has marked the run FAILED and deletes it
then. When nothing ends the run within ``WAIT_S`` (the entry point ran with ``MLFLOW_RUN_ID``
set by hand, or ``mlflow run`` was killed), it ends and deletes the run itself.

A deleted run keeps its params in the store until ``mlflow gc`` purges it, so on a database or
file store the run is then purged at once, as ``mlflow gc`` does; a tracking server offers no
purge over HTTP, so there the printed ``mlflow gc`` command, run on the server's host, does it.
"""

from __future__ import annotations

import sys
import time

WAIT_S = 120.0
POLL_S = 0.2


def discard(run_id: str, wait_s: float = WAIT_S) -> bool:
    """Wait for ``run_id`` to leave RUNNING (at most ``wait_s``), then delete it, and purge it
    where the store allows; returns whether it was purged."""
    import mlflow

    client = mlflow.MlflowClient()
    deadline = time.monotonic() + wait_s
    while client.get_run(run_id).info.status == "RUNNING":
        if time.monotonic() > deadline:
            client.set_terminated(run_id, "FAILED")
            break
        time.sleep(POLL_S)
    client.delete_run(run_id)
    return purge(run_id)


def purge(run_id: str) -> bool:
    """Remove a deleted run, params included, from a database or file store (what
    ``mlflow gc`` does, through the same store method); ``False`` for a tracking server."""
    from mlflow.tracking._tracking_service.utils import _get_store

    hard_delete = getattr(_get_store(), "_hard_delete_run", None)
    if hard_delete is None:
        return False
    hard_delete(run_id)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cars_ml.tracking.discard <run_id>", file=sys.stderr)
        return 2
    from cars_ml.tracking.redaction import redact

    try:
        discard(argv[0])
    # Nobody waits for this process: whatever went wrong is reported, with the fix, on the
    # console the refused command ran in.
    except Exception as exc:  # noqa: BLE001
        print(
            f"warning: could not delete MLflow run {argv[0]}, which holds a password in its "
            f"parameters ({type(exc).__name__}: {redact(exc)}); delete it in the MLflow UI and "
            "purge it with `mlflow gc`.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
