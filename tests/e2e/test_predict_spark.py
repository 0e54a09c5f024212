"""`predict` with engine=spark: one Parquet row per file, the labels of the single-process
`predict` for every good image, an error for each broken one, the run goes on."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote

import mlflow
import pandas as pd
import pytest
from e2e_utils import run_entry
from PIL import Image
from serving_helpers import colour_classifier, colour_images, register_champion

pytest.importorskip("pyspark")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("java"), reason="Spark needs Java (.ci/run installs it)"),
]

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
BROKEN = ("truncated.jpg", "text.jpg", "empty.JPG")


@pytest.fixture()
def folder(tracking_uri, tmp_path):
    """Generated colour images (and the real photos where ../shared has them), plus a truncated
    JPEG, a text file named .jpg and an empty file, some in a subfolder, in a folder with a space."""
    model, names = colour_classifier()
    register_champion(model, names)
    images = tmp_path / "fleet uploads"
    (images / "day 2").mkdir(parents=True)
    pixels, _ = colour_images(12, seed=3)
    for i, array in enumerate(pixels):
        where = images / "day 2" if i % 2 else images
        Image.fromarray(array).save(where / f"frame{i:02d}.{'png' if i % 3 else 'jpg'}")
    for photo in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(photo, images / photo.name)
    jpeg = (images / "frame00.jpg").read_bytes()
    (images / "day 2" / BROKEN[0]).write_bytes(jpeg[: len(jpeg) // 2])
    (images / BROKEN[1]).write_text("not an image, only named like one")
    (images / BROKEN[2]).write_bytes(b"")
    (images / "notes.txt").write_text("not an image, ignored by suffix")
    return images


def test_spark_predict_matches_the_single_process_predict_and_names_broken_files(
    folder, sub_env, tmp_path
):
    csv = tmp_path / "local.csv"
    run_entry(
        "predict",
        "--images",
        str(folder),
        "--output",
        str(csv),
        env=sub_env,
        timeout=300,
    )
    expected = pd.read_csv(csv, keep_default_na=False).set_index("file")

    parquet = tmp_path / "out" / "predictions.parquet"
    args = ["--images", str(folder), "--output", str(parquet), "--batch_size", "4"]
    result = run_entry(
        "predict",
        *args,
        "--engine",
        "spark",
        "--spark_master",
        "local[2]",
        env=sub_env,
        timeout=300,
    )

    frame = pd.read_parquet(parquet)
    assert list(frame.columns) == ["path", "label", "class_id", "probability", "top_k", "error"]
    prefix = folder.as_posix() + "/"
    frame["file"] = [unquote(p).removeprefix("file:").removeprefix(prefix) for p in frame["path"]]
    assert sorted(frame["file"]) == sorted(expected.index)  # one row per file, no more
    frame = frame.set_index("file")
    broken = {"day 2/" + BROKEN[0], BROKEN[1], BROKEN[2]}
    for name in broken:
        assert frame.loc[name, "error"], name
        assert pd.isna(frame.loc[name, "label"]) and expected.loc[name, "error"]
    good = frame[frame["error"].isna()]
    assert set(good.index) == set(expected.index) - broken
    assert (good["label"] == expected.loc[good.index, "label"]).all()
    assert (good["class_id"] == expected.loc[good.index, "class_id"].astype(int)).all()
    assert all(t.startswith('[{"label"') for t in good["top_k"])
    assert "3 file(s) could not be classified" in result.stdout

    # A second run to the same folder is refused: Spark would delete what is there first.
    again = run_entry(
        "predict", *args, "--engine", "spark", "--spark_master", "local[1]",
        env=sub_env, timeout=300, check=False,
    )  # fmt: skip
    assert again.returncode != 0 and "-P overwrite=true" in again.stderr, again.stderr[-2000:]
    assert len(pd.read_parquet(parquet)) == len(expected)  # the first run's output is intact

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.engine = 'spark'")
    runs = runs[runs["status"] == "FINISHED"]
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.num_errors"] == 3
    assert runs.iloc[0]["metrics.num_images"] == len(expected)
