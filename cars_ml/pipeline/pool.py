"""The pipeline's steps (a backbone's study, a backbone's final training) run on worker processes.

With one worker, every step runs in this process, in order: tune, then train, per backbone. With
``N >= 2`` workers, ``N`` spawned processes take steps as they free up, in this order of
preference: a train whose study has finished (the longest single steps, started as early as
possible), else a study that still has trials to hand out (several workers share a study; Optuna
splits its trials between them), else they wait for a step to finish. This process only hands
out steps and collects results.

A CPU run of one step leaves a core idle for long stretches (building a backbone's training
graph, converting it to TFLite and logging it are single-threaded), which the other worker
fills. Latency measurements take a lock shared by every worker and stop the other workers
(SIGSTOP) until they end, so no reported latency shares the CPU with another step.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from cars_ml.measure import benchmark

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60


@dataclass
class Backbone:
    """One backbone's two steps and how far they have got."""

    model: str
    tune: Any  # cars_ml.tuning.run.TuneConfig
    train: Any  # cars_ml.training.run.TrainConfig; None: a study only (a student's params)
    tuning: int = 0  # workers in its study now
    tuned: bool = False  # a worker came back from the study: every trial has been handed out
    training: bool = False
    result: dict | None = None


@dataclass(frozen=True)
class Job:
    kind: str  # "tune" or "train"
    model: str
    cfg: Any


@dataclass
class _Worker:
    number: int
    process: Any
    jobs: Any  # its own queue: the pool knows which worker runs which step
    job: Job | None = None
    started: float = field(default=0.0)


def _outcome(result) -> dict:
    return {
        "run_id": result.run_id,
        "model_version": result.model_version,
        "metrics": dict(result.metrics),
    }


def next_job(backbones: list[Backbone]) -> Job | None:
    """The step a free worker takes next (and mark it taken), or ``None`` to wait.

    A train whose study has finished comes first: trains are the longest single steps, and
    starting them early keeps the last one from running alone at the end. Else the first study
    that still has trials to hand out; a study takes at most ``n_trials`` workers.
    """
    for b in backbones:
        if b.tuned and not b.tuning and not b.training and b.train is not None:
            b.training = True
            return Job("train", b.model, b.train)
    for b in backbones:
        if not b.tuned and b.tuning < b.tune.n_trials:
            b.tuning += 1
            return Job("tune", b.model, b.tune)
    return None


def run_job(job: Job) -> dict | None:
    """Run one step in this process; a train returns its run id, version and metrics.

    Afterwards the step's models and traced graphs are released: a worker that kept them
    grew to about 5 GB after two large backbones.
    """
    import gc

    import keras

    try:
        if job.kind == "tune":
            from cars_ml.tuning.run import run_tune

            run_tune(job.cfg)
            return None
        from cars_ml.training.run import run_train
        from cars_ml.tuning.storage import with_study_params

        return _outcome(run_train(with_study_params(job.cfg)))
    finally:
        keras.backend.clear_session()
        gc.collect()


def _worker(number: int, jobs, done, lock, pids) -> None:
    """A worker's loop: run each job until the ``None`` sentinel, report each outcome."""
    import signal
    import threading

    # A worker started under `mlflow run` must not resume the pipeline's own run; its runs are
    # children of the pipeline run through each step's parent_run_id.
    os.environ.pop("MLFLOW_RUN_ID", None)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    # SIGTERM (the pool stopping early) ends the step's runs KILLED, as Ctrl-C would.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(
        level=os.environ.get("CARS_ML_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [worker {number}] %(name)s: %(message)s",
    )
    benchmark.share_measurements(lock, pids)
    try:
        while (job := jobs.get()) is not None:
            try:
                done.put((number, job.model, run_job(job), None))
            except Exception as exc:  # noqa: BLE001 -- reported to the pool, which decides.
                log.exception("Step %s %s failed", job.kind, job.model)
                done.put((number, job.model, None, f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        pass  # Stopped by the pool: the step's runs have been ended KILLED.


def _exit_with_parent(parent: int) -> None:
    """End this worker once the pipeline is gone, however it died (SIGKILL included): a
    worker whose parent died is adopted by another process, so its parent id changes."""
    while os.getppid() == parent:
        time.sleep(2.0)
    os._exit(1)


class StepPool:
    """Runs every backbone's tune and train steps on ``workers`` processes (see module doc)."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._procs: list[_Worker] = []

    def __enter__(self) -> StepPool:
        return self

    def _start(self) -> None:
        """Spawn the workers at the first step, so a pipeline whose steps are all reused starts
        none (each costs a Python start and the library's imports)."""
        if self.workers >= 2 and not self._procs:
            # Spawned, not forked: TensorFlow's runtime threads do not survive a fork.
            context = multiprocessing.get_context("spawn")
            self._done = context.Queue()
            # Kept on self: a spawned child unpickles them after start() returns, and a lock
            # collected in the meantime would be gone.
            self._lock = context.Lock()
            self._pids = context.Array("i", self.workers, lock=False)
            for number in range(self.workers):
                jobs = context.Queue()
                proc = context.Process(
                    target=_worker,
                    daemon=True,
                    args=(number + 1, jobs, self._done, self._lock, self._pids),
                )
                proc.start()
                self._pids[number] = proc.pid
                self._procs.append(_Worker(number + 1, proc, jobs))

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # Done: let the workers finish cleanly.
            for worker in self._procs:
                worker.jobs.put(None)
            for worker in self._procs:
                worker.process.join(timeout=JOIN_TIMEOUT_S)
        for worker in self._procs:  # Failed or interrupted: stop them now (their runs: KILLED).
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=30)
            if worker.process.is_alive():
                worker.process.kill()

    def run(self, backbones: list[Backbone]) -> dict[str, dict]:
        """Run every backbone's steps; returns each train's outcome by backbone name (``None``
        for a study only)."""
        started = time.perf_counter()
        self._start()
        if not self._procs:
            for b in backbones:
                if not b.tuned:  # A distillation student has no study of its own.
                    _announce("tuning", b.model, 0, started)
                    run_job(Job("tune", b.model, b.tune))
                if b.train is not None:
                    _announce("training", b.model, 0, started)
                    b.result = run_job(Job("train", b.model, b.train))
            return {b.model: b.result for b in backbones}
        pending = len(backbones)
        while pending:
            for worker in self._procs:
                if worker.job is None:
                    self._assign(worker, backbones, started)
            number, model, result, error = self._next_report()
            worker = self._procs[number - 1]
            job, worker.job = worker.job, None
            b = next(b for b in backbones if b.model == model)
            took = time.perf_counter() - worker.started
            if job.kind == "tune":
                b.tuning -= 1
                b.tuned = True
                if error:
                    # The study keeps its completed trials; the train takes the best of them.
                    log.warning(
                        "Worker %d failed tuning %s (%s); carrying on.", number, model, error
                    )
                print(f"[pipeline] worker {number}: {model} study done ({took:.0f} s)", flush=True)
                if b.train is None and not b.tuning:
                    pending -= 1  # A study only: done when its last worker is back.
                continue
            if error:
                raise RuntimeError(f"Training {model} failed on worker {number}: {error}")
            b.result = result
            pending -= 1
            print(f"[pipeline] worker {number}: {model} trained ({took:.0f} s)", flush=True)
        return {b.model: b.result for b in backbones}

    def _assign(self, worker: _Worker, backbones: list[Backbone], started: float) -> None:
        job = next_job(backbones)
        if job is not None:
            worker.job, worker.started = job, time.perf_counter()
            _announce(
                "training" if job.kind == "train" else "tuning", job.model, worker.number, started
            )
            worker.jobs.put(job)

    def _next_report(self) -> tuple:
        while True:
            try:
                return self._done.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in self._procs if w.job is not None and not w.process.is_alive()]
                if dead:
                    w = dead[0]
                    raise RuntimeError(
                        f"Worker {w.number} (pid {w.process.pid}) died while "
                        f"{'training' if w.job.kind == 'train' else 'tuning'} {w.job.model} "
                        f"(exit code {w.process.exitcode}). Run the same command again: finished "
                        "backbones are reused and the study resumes."
                    ) from None


def _announce(what: str, model: str, worker: int, started: float) -> None:
    where = f"worker {worker}: " if worker else ""
    elapsed = time.perf_counter() - started
    print(f"[pipeline] {where}{what} {model} (at {elapsed:.0f} s)", flush=True)
