"""`predict` over a folder: real photos get class names, a corrupt file is named, exit status 0."""

from __future__ import annotations

import shutil

import mlflow
import pandas as pd
import pytest
from e2e_utils import run_entry
from serving_helpers import CAR_NAMES, register_champion, tiny_mobilenet

pytestmark = pytest.mark.e2e


@pytest.fixture()
def folder(tracking_uri, tmp_path, car_photos, monkeypatch):
    """Three photos (one in a subfolder with an upper-case suffix) and one corrupt file."""
    monkeypatch.chdir(tmp_path)
    register_champion(tiny_mobilenet(), CAR_NAMES)
    images = tmp_path / "my photos"
    (images / "sub dir").mkdir(parents=True)
    photos = car_photos[-3:]  # the real ones when ../shared has them
    shutil.copy(photos[0], images / "first.jpg")
    shutil.copy(photos[1], images / "sub dir" / "second.JPG")
    shutil.copy(photos[2], images / "third.jpeg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (images / "notes.txt").write_text("not an image, ignored by suffix")
    return images


def test_predict_folder_names_the_corrupt_file_and_exits_zero(folder, sub_env, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    result = run_entry(
        "predict",
        "--images",
        str(folder),
        "--output",
        str(output),
        env=sub_env,
        timeout=300,
    )

    frame = pd.read_csv(output, keep_default_na=False)
    assert list(frame.columns) == ["file", "label", "class_id", "probability", "top5", "error"]
    assert sorted(frame["file"]) == sorted(
        ["first.jpg", "sub dir/second.JPG", "third.jpeg", "broken.png"]
    )
    good = frame[frame["error"] == ""]
    assert len(good) == 3
    assert set(good["label"]) <= set(CAR_NAMES)
    assert all(
        CAR_NAMES[int(c)] == label for c, label in zip(good["class_id"], good["label"], strict=True)
    )
    assert "." not in "".join(good["class_id"].astype(str))
    assert all(len(t.split("; ")) == 3 and ":" in t for t in good["top5"])
    bad = frame[frame["file"] == "broken.png"].iloc[0]
    assert bad["label"] == "" and "image" in bad["error"].lower()
    assert "broken.png" in result.stdout and "3 of 4 images classified" in result.stdout

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'predict'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.num_errors"] == 1
    artifacts = mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"])
    assert [a.path for a in artifacts] == ["predictions.csv"]


def test_predict_refuses_a_missing_folder_and_a_missing_champion(sub_env, tmp_path):
    result = run_entry(
        "predict", "--images", str(tmp_path / "nope"), env=sub_env, timeout=300, check=False
    )
    assert result.returncode == 2 and "is not a folder" in result.stderr
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    result = run_entry(
        "predict", "--images", str(tmp_path / "imgs"), env=sub_env, timeout=300, check=False
    )
    assert result.returncode == 2
    assert "models:/stanford-cars-classifier@champion does not resolve" in result.stderr
