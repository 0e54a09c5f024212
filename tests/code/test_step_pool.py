"""The pipeline's step pool: which step a free worker takes, and exclusive latency measurements."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from types import SimpleNamespace

import pytest

from cars_ml.measure import benchmark
from cars_ml.pipeline.pool import Backbone, next_job


def _backbones(*names: str, n_trials: int = 2) -> list[Backbone]:
    return [Backbone(n, SimpleNamespace(n_trials=n_trials), SimpleNamespace()) for n in names]


def _take(backbones) -> tuple[str, str] | None:
    job = next_job(backbones)
    return None if job is None else (job.kind, job.model)


def _tune_returns(b: Backbone) -> None:
    """What the pool does when a worker comes back from ``b``'s study."""
    b.tuning -= 1
    b.tuned = True


def test_two_workers_share_the_first_study_then_train_before_tuning_on():
    ir, inc, mob = plan = _backbones("inception_resnet", "inception", "mobilenet")
    assert _take(plan) == ("tune", "inception_resnet")
    assert _take(plan) == ("tune", "inception_resnet")  # a second worker joins the study
    assert ir.tuning == 2
    _tune_returns(ir)  # the first worker back: every trial is handed out, one still runs
    assert _take(plan) == ("tune", "inception")  # ir's train must wait for its last trial
    _tune_returns(ir)
    assert _take(plan) == ("train", "inception_resnet")  # ready trains come first
    assert _take(plan) == ("tune", "inception")
    assert _take(plan) == ("tune", "mobilenet")
    assert _take(plan) == ("tune", "mobilenet")
    assert _take(plan) is None  # every study is full and no train is ready: wait
    _tune_returns(inc)
    _tune_returns(inc)
    _tune_returns(mob)
    assert _take(plan) == ("train", "inception")
    assert _take(plan) is None  # mobilenet's last trial still runs
    _tune_returns(mob)
    assert _take(plan) == ("train", "mobilenet")
    assert _take(plan) is None
    assert all(b.training for b in plan)


def test_a_study_only_step_is_never_trained_and_ends_with_its_last_worker(monkeypatch):
    from cars_ml.pipeline import pool

    teacher, student = _backbones("efficientnet_lite2", "efficientnet_lite0")
    student.train = None
    plan = [teacher, student]
    assert _take(plan) == ("tune", "efficientnet_lite2")
    assert _take(plan) == ("tune", "efficientnet_lite2")
    _tune_returns(teacher)
    assert _take(plan) == ("tune", "efficientnet_lite0")
    _tune_returns(teacher)
    assert _take(plan) == ("train", "efficientnet_lite2")
    _tune_returns(student)
    assert _take(plan) is None  # the student's study is done, and it has no train

    ran, alone = [], _backbones("efficientnet_lite0")
    alone[0].train = None
    monkeypatch.setattr(pool, "run_job", lambda job: ran.append((job.kind, job.model)))
    with pool.StepPool(1) as workers:
        results = workers.run(alone)
    assert ran == [("tune", "efficientnet_lite0")]
    assert results == {"efficientnet_lite0": None}


def test_a_study_takes_at_most_n_trials_workers():
    plan = _backbones("vgg16", "vgg19", n_trials=1)
    assert _take(plan) == ("tune", "vgg16")
    assert _take(plan) == ("tune", "vgg19")
    assert _take(plan) is None


def _spin(counter) -> None:
    # No lock: a process stopped while holding the counter's lock would block every reader.
    while True:
        counter.value += 1


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_a_measurement_stops_the_other_workers_and_only_for_its_duration():
    context = multiprocessing.get_context("spawn")
    counter = context.RawValue("q", 0)  # one writer; reads never wait on a lock
    other = context.Process(target=_spin, args=(counter,), daemon=True)
    other.start()
    try:
        while counter.value == 0:
            time.sleep(0.05)
        lock = context.Lock()
        benchmark.share_measurements(lock, [os.getpid(), other.pid])
        with benchmark.other_workers_stopped():
            time.sleep(0.2)  # let a stop that is still being delivered land
            before = counter.value
            time.sleep(0.5)
            assert counter.value == before, "the other worker ran during the measurement"
            assert not lock.acquire(block=False), "the measurement must hold the shared lock"
        time.sleep(0.5)
        assert counter.value > before, "the other worker was not resumed"
        assert lock.acquire(block=False)
        lock.release()
    finally:
        benchmark.share_measurements(None, [])
        other.kill()
        other.join()


def test_one_worker_runs_each_study_then_its_train_and_a_student_without_a_study(monkeypatch):
    from cars_ml.pipeline import pool

    ran = []

    def record(job):
        ran.append((job.kind, job.model))
        return {"model": job.model} if job.kind == "train" else None

    monkeypatch.setattr(pool, "run_job", record)
    plain = _backbones("mobilenet")[0]
    student = Backbone("mobilenet-from-xception", None, SimpleNamespace(), tuned=True)
    with pool.StepPool(1) as workers:
        results = workers.run([plain, student])
    assert ran == [
        ("tune", "mobilenet"),
        ("train", "mobilenet"),
        ("train", "mobilenet-from-xception"),
    ]
    assert results["mobilenet-from-xception"] == {"model": "mobilenet-from-xception"}
