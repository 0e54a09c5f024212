"""Faults injected for real: killed workers, killed training, unreachable stores, dropped
database connections. Nothing completed may be lost, nothing may stay RUNNING forever.

Trial heartbeats are shortened to 1 s with a 3 s grace period through the environment
(``CARS_ML_OPTUNA_HEARTBEAT_S`` / ``CARS_ML_OPTUNA_GRACE_S``), so a dead worker's trial is
recognised as stale within seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from e2e_utils import ROOT, run_entry, tiny_pipeline_args
from fast_fail import assert_fails_fast
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from cars_ml.tuning.storage import GRACE_ENV, HEARTBEAT_ENV

pytestmark = pytest.mark.e2e

GRACE_S = 3
TINY = [
    "--model",
    "mobilenet",
    "--weights",
    "none",
    "--image_size",
    "32",
    "--max_classes",
    "3",
    "--max_per_class",
    "8",
]
MODEL_NAME = "stanford-cars-classifier"


@pytest.fixture()
def fault_env(sub_env) -> dict:
    return {**sub_env, HEARTBEAT_ENV: "1", GRACE_ENV: str(GRACE_S)}


def _start(script: str, *args: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "entrypoints" / f"{script}.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout_s: float = 400):
    """Poll ``check()`` until it returns something truthy; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _trials(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except KeyError:  # the worker has not created the study yet
        return []


def _run_status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- a. a tuning worker SIGKILLed in the middle of a trial -------------------------------------


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_sigkilled_tuning_worker_trial_failed_retried_and_run_closed(
    tracking_uri, fault_env, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = "killed"
    args = [
        *TINY,
        "--max_epochs",
        "3",
        "--pruner",
        "none",
        "--study_name",
        study,
        "--storage",
        storage,
    ]
    mlflow.search_experiments()  # Create the tracking database before the worker uses it.
    log = tmp_path / "worker1.log"
    worker = _start("tune", *args, "--n_trials", "3", env=fault_env, log=log)
    try:

        def second_trial_running():
            trials = _trials(storage, study)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
            ]
            return (done, running[0]) if done and running else None

        completed, victim = _wait_for("trial 1 running", second_trial_running, worker, log)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        _kill_group(worker)
    assert worker.returncode == -signal.SIGKILL
    # Right after the kill nothing has noticed: the trial and its run look alive.
    (left,) = [t for t in _trials(storage, study) if t.number == victim.number]
    assert left.state == TrialState.RUNNING
    victim_run = victim.user_attrs["mlflow_run_id"]
    assert _run_status(victim_run) == "RUNNING"
    time.sleep(GRACE_S + 1)

    proc = run_entry("tune", *args, "--n_trials", "1", env=fault_env, timeout=600)
    trials = {t.number: t for t in optuna.load_study(study_name=study, storage=storage).trials}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [
        t
        for t in trials.values()
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number
    ]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trials.values()]
    assert retries[0].state == TrialState.COMPLETE, proc.stdout[-2000:]
    assert retries[0].params == victim.params  # the same point of the search space, run again
    for done in completed:  # nothing completed before the kill is lost or changed
        assert trials[done.number].state == TrialState.COMPLETE
        assert trials[done.number].values == done.values
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    # The killed trial's MLflow run (and the dead worker's parent run) no longer RUNNING.
    assert _run_status(victim_run) == "KILLED"
    dead_parent = mlflow.get_run(victim_run).data.tags["mlflow.parentRunId"]
    assert _run_status(dead_parent) == "KILLED"
    assert _run_status(retries[0].user_attrs["mlflow_run_id"]) == "FINISHED"


def test_sigtermed_tuning_worker_ends_trial_failed_and_runs_killed(
    tracking_uri, fault_env, tmp_path
):
    """SIGTERM (``kill``, Kubernetes) is handled, unlike SIGKILL: no waiting for a heartbeat."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        *TINY,
        "--max_epochs",
        "50",
        "--pruner",
        "none",
        "--study_name",
        "termed",
        "--storage",
        storage,
        "--n_trials",
        "2",
    ]
    mlflow.search_experiments()
    log = tmp_path / "worker.log"
    worker = _start("tune", *args, env=fault_env, log=log)
    try:

        def trial_training():
            running = [t for t in _trials(storage, "termed") if t.state == TrialState.RUNNING]
            return running[0] if running and running[0].intermediate_values else None

        victim = _wait_for("a trial's first epoch", trial_training, worker, log)
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
    finally:
        _kill_group(worker)
    output = log.read_text()
    assert worker.returncode == 128 + signal.SIGTERM, output[-3000:]
    # Optuna logs the interrupted trial with its stack; the process ends with one clear line.
    assert output.rstrip().splitlines()[-1].startswith("error: terminated by SIGTERM"), output
    (trial,) = optuna.load_study(study_name="termed", storage=storage).trials
    assert trial.number == victim.number and trial.state == TrialState.FAIL
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert _run_status(run.data.tags["mlflow.parentRunId"]) == "KILLED"


# --- b. a training run killed with SIGTERM in the middle of an epoch ---------------------------


def _train_runs() -> list:
    return mlflow.search_runs(
        filter_string="tags.step = 'train'", search_all_experiments=True, output_format="list"
    )


def test_sigtermed_training_registers_nothing_ends_killed_and_rerun_works(
    tracking_uri, sub_env, tmp_path
):
    common = [*TINY, "--fine_tune_epochs", "0", "--export_tflite", "false"]
    mlflow.search_experiments()
    log = tmp_path / "train.log"
    # Patience as long as the epochs: early stopping must not end the run before the signal.
    proc = _start("train", *common, "--epochs", "500", "--patience", "500", env=sub_env, log=log)
    try:

        def training_started():
            runs = _train_runs()
            client = mlflow.MlflowClient()
            if runs and client.get_metric_history(runs[0].info.run_id, "val_f1_macro"):
                return runs[0]
            return None

        run = _wait_for("the first epoch", training_started, proc, log)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        _kill_group(proc)
    output = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "terminated by SIGTERM" in output
    assert "Traceback" not in output, output[-3000:]
    assert _run_status(run.info.run_id) == "KILLED"
    assert mlflow.MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'") == []

    run_entry("train", *common, "--epochs", "1", env=sub_env, timeout=600)
    finished = [r for r in _train_runs() if r.info.status == "FINISHED"]
    assert len(finished) == 1
    (version,) = mlflow.MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.run_id == finished[0].info.run_id != run.info.run_id


# --- c. the tracking store unreachable at start -------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens once the socket is closed


ENTRY_POINTS = ["prepare_data", "train", "tune", "promote", "main", "predict", "serve", "benchmark"]


@pytest.mark.parametrize("kind", ["http", "postgresql"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unreachable_tracking_store_fails_fast_naming_it(entry, kind, tmp_path):
    port = _closed_port()
    uri = (
        f"http://127.0.0.1:{port}"
        if kind == "http"
        else f"postgresql://cars:s3cretpw@127.0.0.1:{port}/mlflow"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    args = []
    if entry == "predict":
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "a.png").write_bytes(b"not checked before the tracking store")
        args = ["--images", str(tmp_path / "images")]
    started = time.monotonic()
    proc = run_entry(entry, *args, env=env, check=False, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    shown_uri = uri.replace("s3cretpw", "***")
    assert f"at {shown_uri} is unreachable" in proc.stderr, proc.stderr[-2000:]
    assert "s3cretpw" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Seconds after the imports every entry point pays, not MLflow's ~100 s of retries.
    assert_fails_fast(entry, elapsed)


# --- d. PostgreSQL connections dropped during a study -------------------------------------------


def _terminate_backends(database: str) -> int:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=5432,
        user="postgres",
        dbname="postgres",
        autocommit=True,
        connect_timeout=3,
    ) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_postgres_connections_dropped_during_study(
    tracking_uri, fault_env, postgres_url, tmp_path, monkeypatch
):
    from cars_ml.tuning.storage import open_storage

    # Beats every second, as elsewhere, but a longer grace: on a loaded 2-core machine a
    # reconnecting heartbeat can be a few seconds late, and this test asks whether live trials
    # survive dropped connections, not how tight a grace period can be.
    grace_s = 6
    fault_env = {**fault_env, GRACE_ENV: str(grace_s)}
    monkeypatch.setenv(HEARTBEAT_ENV, "1")
    monkeypatch.setenv(GRACE_ENV, str(grace_s))
    database = postgres_url.rsplit("/", 1)[1]
    study = "dropped"
    args = [
        *TINY,
        "--max_epochs",
        "3",
        "--pruner",
        "none",
        "--study_name",
        study,
        "--storage",
        postgres_url,
        "--n_trials",
        "3",
    ]
    mlflow.search_experiments()
    log = tmp_path / "worker.log"
    worker = _start("tune", *args, env=fault_env, log=log)

    def observe() -> list:
        """What a second worker does at each trial start: fail trials with stale heartbeats."""
        try:
            loaded = optuna.load_study(study_name=study, storage=open_storage(postgres_url))
            optuna.storages.fail_stale_trials(loaded)
            return loaded.trials
        except (KeyError, ValueError, optuna.exceptions.StorageInternalError):
            return []  # not created yet, or our own connection was among those dropped

    terminated = []
    try:
        _wait_for(
            "a running trial",
            lambda: any(t.state == TrialState.RUNNING for t in observe()),
            worker,
            log,
        )
        # Drop every connection of the database each second while the worker trains, and keep
        # watching its heartbeats as a second worker would until it exits.
        while worker.poll() is None:
            if len(terminated) < 10:
                terminated.append(_terminate_backends(database))
            time.sleep(1.0)
            observe()
        worker.wait(timeout=600)
    finally:
        _kill_group(worker)
    output = log.read_text()
    print(f"\n[pg-drop] terminated backends {terminated}; worker exit {worker.returncode}")
    assert sum(terminated) >= 3, terminated
    assert "Exception in thread" not in output, output[-4000:]  # the heartbeat thread lives on
    if worker.returncode != 0:
        # Failing is allowed, but with one clear line naming the storage, not a traceback.
        assert "Traceback" not in output, output[-4000:]
        assert "Lost the connection to Optuna storage" in output, output[-3000:]
    # The study is consistent afterwards: loadable, unique numbers, nothing left RUNNING once
    # the grace period has passed and stale trials are failed.
    time.sleep(grace_s + 1)
    trials = observe()
    assert trials, "the study could not be loaded"
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and numbers == sorted(numbers)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.values and "mlflow_run_id" in trial.user_attrs
    if worker.returncode == 0:
        # No live trial was failed as stale by the watcher: every trial completed.
        failures = [line for line in output.splitlines() if "FAIL" in line or "stale" in line]
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, (
            [(t.number, t.state) for t in trials],
            failures[-10:],
        )


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_storage_writes_survive_connections_killed_mid_statement(postgres_url, monkeypatch):
    """Every trial write lands although the database kills the connections all the time."""
    import threading

    from cars_ml.tuning.storage import open_storage

    monkeypatch.setenv(HEARTBEAT_ENV, "1")
    monkeypatch.setenv(GRACE_ENV, "3")
    storage = open_storage(postgres_url)
    study = optuna.create_study(study_name="writes", storage=storage)
    trial = study.ask()
    database = postgres_url.rsplit("/", 1)[1]
    stop, killed = threading.Event(), []

    def killer():
        while not stop.is_set():
            killed.append(_terminate_backends(database))
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        for step in range(150):
            trial.report(step / 150, step)
            trial.set_user_attr(f"attr{step % 5}", step)
            storage.record_heartbeat(trial._trial_id)
    finally:
        stop.set()
        thread.join(timeout=10)
    study.tell(trial, 0.5)
    assert sum(killed) >= 10, f"the fault was not injected: {sum(killed)} backends killed"
    frozen = optuna.load_study(study_name="writes", storage=open_storage(postgres_url)).trials[0]
    assert frozen.state == TrialState.COMPLETE and frozen.value == 0.5
    assert sorted(frozen.intermediate_values) == list(range(150))
    assert frozen.user_attrs["attr4"] == 149


def _children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc; Linux only)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_pipeline_killed_outright_takes_its_tuning_worker_with_it(sub_env, tmp_path):
    args = [
        *tiny_pipeline_args(),
        "--workers",
        "2",
    ]
    mlflow.search_experiments()
    log = tmp_path / "pipeline.log"
    pipeline = _start("main", *args, env=sub_env, log=log)
    try:
        _wait_for("a trial", lambda: "[tune] trial" in log.read_text(), pipeline, log)
        workers = _children_of(pipeline.pid)  # the tuning worker (and multiprocessing's helper)
        assert workers
        os.kill(pipeline.pid, signal.SIGKILL)
        pipeline.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_state(w) not in ("", "Z") for w in workers):
            time.sleep(0.5)
        assert [w for w in workers if _state(w) not in ("", "Z")] == [], "a worker outlived it"
    finally:
        _kill_group(pipeline)


def _state(pid: int) -> str:
    """A process's state letter, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""
