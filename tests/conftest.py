"""Shared fixtures: the real-data folder beside the project, temporary MLflow stores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the entry points do (entrypoints/_common.py): oneDNN kernels on AVX2-only CPUs too.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# What MLflow and Optuna create in the working directory when a store is left at its default.
DEFAULT_STORES = ("mlruns", "mlflow.db", "optuna.db")


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    """Fail the run if a test (or a process it started) left a default store in the repository:
    every store belongs in a test's own folder."""
    before = {name for name in DEFAULT_STORES if (ROOT / name).exists()}
    yield
    created = [n for n in DEFAULT_STORES if (ROOT / n).exists() and n not in before]
    if created:
        pytest.fail(
            f"the tests created {created} in {ROOT}: a client or child process used the default "
            "store in the repository's folder; give it the test's tracking URI or folder"
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real Stanford Cars material), or skip when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real Stanford Cars material not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def car_photos(tmp_path_factory) -> list[Path]:
    """Photos for end-to-end serving: three 224 px JPEG car drawings made here (so a clone
    without ``../shared`` runs every path) followed by the three real Stanford Cars photos
    when ``../shared/data`` has them."""
    import numpy as np
    from PIL import Image

    from cars_ml.data.synthetic import draw_car

    folder = tmp_path_factory.mktemp("car_photos")
    rng = np.random.default_rng(0)
    photos = []
    for label in range(3):
        pixels, _ = draw_car(label, 224, 224, rng)
        photos.append(folder / f"drawn_{label}.jpg")
        Image.fromarray(pixels).save(photos[-1], quality=90)
    real = sorted((SHARED_DATA / "samples").glob("*.jpg"))
    return photos + real


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking + registry store for one test, set for this process and children."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Artifacts of a SQLite store default to ./mlruns: keep them in the test's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    _forget_experiment()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    _forget_experiment()


@pytest.fixture(scope="module", autouse=True)
def _no_experiment_from_an_earlier_module():
    """Each module starts without the experiment an earlier module selected in this process.

    A step run in process (a promote, a registration) selects an experiment, which stays in
    ``MLFLOW_EXPERIMENT_ID`` when the test's fixture had nothing to restore; child processes
    inherit it. Under pytest-xdist a worker runs modules in an order that changes from run to
    run, so a later module's fresh store would be asked for that id.
    """
    _forget_experiment()
    yield
    _forget_experiment()


def _forget_experiment() -> None:
    """Drop the experiment an earlier test selected in this process.

    ``mlflow.set_experiment`` keeps the id in a module global and in ``MLFLOW_EXPERIMENT_ID``;
    against the next test's fresh store that id does not exist.
    """
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated datasets and cached features go to one session-wide temporary folder."""
    cache = tmp_path_factory.getbasetemp() / "cars_ml_cache"
    monkeypatch.setenv("CARS_ML_CACHE", str(cache))
