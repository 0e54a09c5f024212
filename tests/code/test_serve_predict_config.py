"""Configs of the serve and predict steps refuse bad values before any work; files are found."""

from __future__ import annotations

import sys

import pytest

from cars_ml.serving.predict import PredictConfig, _format_top5, find_images
from cars_ml.serving.run import ServeConfig, serve_command


def test_serve_uri_and_command():
    cfg = ServeConfig(port=6000, workers=2)
    assert cfg.uri == "models:/stanford-cars-classifier@champion"
    assert serve_command(cfg) == [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        cfg.uri,
        "--env-manager",
        "local",
        "-p",
        "6000",
        "-h",
        "127.0.0.1",
        "-w",
        "2",
    ]
    assert ServeConfig(model_uri="runs:/abc/model").uri == "runs:/abc/model"
    assert ServeConfig(alias="challenger").uri.endswith("@challenger")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "between 1 and 65535"),
        ({"port": 70000}, "between 1 and 65535"),
        ({"workers": 0}, "workers=0 must be >= 1"),
        ({"host": "my host"}, "is not an IP address"),
        ({"alias": ""}, "pass model_uri, or both model_name and alias"),
    ],
)
def test_serve_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_predict_config_refuses(tmp_path):
    with pytest.raises(ValueError, match="images is required"):
        PredictConfig(images="")
    with pytest.raises(ValueError, match="is not a folder"):
        PredictConfig(images=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="between 1 and the serving limit of 64"):
        PredictConfig(images=str(tmp_path), batch_size=65)


def test_find_images_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ("b.JPG", "a.png", "deep/ü x.WebP", "deep/c.bmp", "d.jpeg", "e.txt", "f.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.png", "b.JPG", "d.jpeg", "deep/c.bmp", "deep/ü x.WebP"]


def test_top5_format():
    top = [{"label": "A", "probability": 0.5}, {"label": "B C", "probability": 0.25}]
    assert _format_top5(top) == "A:0.5000; B C:0.2500"
