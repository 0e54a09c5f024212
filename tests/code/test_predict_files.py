"""`predict` over hostile folders: huge files refused unread, every failure a CSV row, no formulas.

The model is a stand-in with the served model's interface (``predict`` on a frame of base64
images, ``unwrap_python_model().limits``), so these tests need no TensorFlow.
"""

from __future__ import annotations

import base64
import os
import pathlib
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from cars_ml import tracking
from cars_ml.serving import predict as predict_mod
from cars_ml.serving.decode import Limits
from cars_ml.serving.predict import PredictConfig, run_predict

LIMIT = 1024  # bytes per image the stand-in model accepts


class FakeModel:
    """Answers every image with a label whose text a spreadsheet would run as a formula."""

    def __init__(self):
        self.seen: list[bytes] = []

    def unwrap_python_model(self):
        return SimpleNamespace(limits=Limits(max_image_bytes=LIMIT))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for i, value in enumerate(frame["image"]):
            data = base64.b64decode(value)
            self.seen.append(data)
            if data.startswith(b"mlflow-bad"):
                raise MlflowException(f"image {i}: cannot decode")
            if data.startswith(b"crash"):
                raise RuntimeError("decoder blew up")
            top = [{"label": '=HYPERLINK("http://x")', "probability": 0.9}]
            rows.append(
                {"label": '=HYPERLINK("http://x")', "class_id": 1, "probability": 0.9, "top_k": top}
            )
        return pd.DataFrame(rows)


@pytest.fixture()
def model(monkeypatch, tracking_uri) -> FakeModel:
    fake = FakeModel()
    monkeypatch.setattr(tracking, "load_pyfunc", lambda uri: fake)
    monkeypatch.setattr(tracking, "check_model_uri", lambda uri: None)
    return fake


def _run(folder, tmp_path) -> pd.DataFrame:
    out = tmp_path / "out.csv"
    run_predict(PredictConfig(images=str(folder), output=str(out), batch_size=4))
    return pd.read_csv(out, keep_default_na=False, dtype=str).set_index("file")


def test_huge_file_is_refused_before_it_is_read(model, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"fine")
    huge = folder / "huge.jpg"
    with huge.open("wb") as handle:
        handle.truncate(3 * 1024**3)  # sparse: 3 GB long, no disk used
    real_read = pathlib.Path.read_bytes

    def guarded(self):
        if self.stat().st_size > 100 * 1024**2:
            raise AssertionError(f"{self} was read whole")
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", guarded)
    frame = _run(folder, tmp_path)
    assert frame.loc["ok.jpg", "error"] == ""
    error = frame.loc["huge.jpg", "error"]
    assert str(3 * 1024**3) in error and str(LIMIT) in error and "not read" in error
    assert all(len(data) <= LIMIT for data in model.seen)


def test_every_per_file_failure_is_a_row_and_the_run_goes_on(model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "c.jpg", "e.jpg"):
        (folder / name).write_bytes(b"fine")
    (folder / "b.jpg").write_bytes(b"mlflow-bad")
    (folder / "d.jpg").write_bytes(b"crash")
    (folder / "locked.jpg").write_bytes(b"fine")
    os.chmod(folder / "locked.jpg", 0)
    frame = _run(folder, tmp_path)
    assert len(frame) == 6
    assert frame.loc["b.jpg", "error"] == "cannot decode"
    assert "RuntimeError: decoder blew up" in frame.loc["d.jpg", "error"]
    for name in ("a.jpg", "c.jpg", "e.jpg"):
        assert frame.loc[name, "error"] == "" and frame.loc[name, "class_id"] == "1"
    if os.geteuid() != 0:  # root reads a mode-0 file anyway
        assert "cannot read file" in frame.loc["locked.jpg", "error"]


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_formula_cells_are_neutralised(model, tmp_path, prefix):
    folder = tmp_path / "imgs"
    folder.mkdir()
    name = f"{prefix}cmd|' -C calc'!A0.jpg"
    (folder / name).write_bytes(b"fine")
    (folder / f"{prefix}bad.jpg").write_bytes(b"mlflow-bad")
    out = tmp_path / "out.csv"
    run_predict(PredictConfig(images=str(folder), output=str(out), batch_size=4))
    frame = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert "'" + name in set(frame["file"])
    for column in ("file", "label", "top5", "error"):
        for cell in frame[column]:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
    assert set(frame.loc[frame["error"] == "", "label"]) == {'\'=HYPERLINK("http://x")'}


def test_neutralise_leaves_ordinary_cells_alone():
    assert predict_mod.spreadsheet_safe("photo 1.jpg") == "photo 1.jpg"
    assert predict_mod.spreadsheet_safe("=1+1") == "'=1+1"
    assert predict_mod.spreadsheet_safe(None) is None
    assert predict_mod.spreadsheet_safe(0.5) == 0.5
