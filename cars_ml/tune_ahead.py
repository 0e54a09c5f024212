"""Tuning ahead: spawned workers tune the pipeline's next studies while this process trains.

Building a large backbone's training graph, converting it to TFLite and loading it back each
keep one core busy for tens of seconds while the other waits. Workers that tune the coming
backbones' studies (in the pipeline's order, each study until it holds its total of trials)
fill that idle core; this process joins each study when it gets there, then trains with its
best params. Every latency this process measures meanwhile stops the workers (SIGSTOP until
the measurement ends, ``benchmark.paused_while_measuring``), so no reported latency shares the
CPU with them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
from collections import Counter
from dataclasses import replace

from cars_ml import benchmark

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60


def _worker(jobs, done) -> None:
    """A worker's loop: run each study job until the ``None`` sentinel, report each one."""
    import threading

    from cars_ml.tune import run_tune

    # A worker started under `mlflow run` must not resume the pipeline's own run.
    os.environ.pop("MLFLOW_RUN_ID", None)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    while (cfg := jobs.get()) is not None:
        try:
            run_tune(cfg)
            done.put((cfg.study_name, None))
        except Exception as exc:  # noqa: BLE001 -- reported to the pipeline, which carries on.
            done.put((cfg.study_name, f"{type(exc).__name__}: {exc}"))


def _exit_with_parent(parent: int) -> None:
    """End this worker once its pipeline is gone, however it died (SIGKILL included): a
    worker whose parent died is adopted by another process, so its parent id changes."""
    while os.getppid() == parent:
        time.sleep(2.0)
    os._exit(1)


class TuningAhead:
    """``workers`` spawned processes that tune the studies submitted, in order.

    ``tune(cfg)`` runs this process's share of a study and returns once every worker has
    finished with it; with ``workers=0`` it is plain ``run_tune``. Use as a context manager:
    leaving it stops the workers.
    """

    def __init__(self, workers: int, parent_run_id: str = ""):
        self.workers = max(0, workers)
        self.parent_run_id = parent_run_id
        self._procs: list = []
        self._reports: Counter = Counter()
        self._submitted: Counter = Counter()

    def __enter__(self) -> TuningAhead:
        if self.workers:
            # Spawned, not forked: TensorFlow's runtime threads do not survive a fork.
            context = multiprocessing.get_context("spawn")
            self._jobs, self._done = context.Queue(), context.Queue()
            self._procs = [
                context.Process(target=_worker, args=(self._jobs, self._done), daemon=True)
                for _ in range(self.workers)
            ]
            for proc in self._procs:
                proc.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # Done: let the workers finish cleanly.
            for _ in self._procs:
                self._jobs.put(None)
            for proc in self._procs:
                proc.join(timeout=JOIN_TIMEOUT_S)
        for proc in self._procs:  # Failed or interrupted: stop them now.
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]

    def submit(self, cfg) -> None:
        """Queue a study (its ``n_trials`` is the study's total) for every worker."""
        job = replace(cfg, study_total=True, parent_run_id=self.parent_run_id)
        for _ in self._procs:
            self._jobs.put(job)
            self._submitted[cfg.study_name] += 1

    def tune(self, cfg):
        """Join the study submitted as ``cfg`` (or run it alone), wait for the workers on it."""
        from cars_ml.tune import run_tune

        study = run_tune(replace(cfg, study_total=bool(self._procs)))
        self._wait(cfg.study_name)
        return study

    def measuring(self):
        """Context in which this process's latency measurements stop the workers."""
        return benchmark.paused_while_measuring(self.pids)

    def _wait(self, study_name: str) -> None:
        while self._reports[study_name] < self._submitted[study_name]:
            try:
                name, error = self._done.get(timeout=1.0)
            except queue.Empty:
                if not self.pids:
                    log.warning("Every tuning worker has exited; tuning goes on in this process.")
                    self._submitted.clear()
                    return
                continue
            self._reports[name] += 1
            if error:
                # The study keeps the trials that completed; a failed one is retried later.
                log.warning("A tuning worker failed on study %s (%s); carrying on.", name, error)
