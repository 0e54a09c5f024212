"""One home per default: the config dataclasses own them, and the derived parsers agree.

Each entry point's ``config(args)`` turns its parsed arguments into its step's config. Parsed
from nothing (plus the few arguments a step cannot do without), that config must equal the
dataclass built from its own defaults: a default written as text (``auto``, ``none``) must parse
back to the field's default. MLproject is checked against the dataclasses in
test_project_files.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "entrypoints"))


def _parsed(script: str, *args: str):
    module = importlib.import_module(script)
    return module, module.build_parser().parse_args(list(args))


def test_train_defaults_are_the_config_defaults():
    from cars_ml.training.run import TrainConfig

    module, a = _parsed("train")
    assert module.config(a) == TrainConfig(model="mobilenet")


def test_distill_defaults_are_the_config_defaults():
    from cars_ml.training.run import TrainConfig

    module, a = _parsed("distill", "--teacher", "models:/m/1")
    assert module.config(a) == TrainConfig(model="mobilenet", teacher="models:/m/1")


def test_tune_defaults_are_the_config_defaults():
    from cars_ml.tuning.run import TuneConfig

    module, a = _parsed("tune")
    assert module.config(a) == TuneConfig(model="mobilenet")


def test_main_defaults_are_the_config_defaults():
    from cars_ml.pipeline.plan import PipelineConfig

    module, a = _parsed("main")
    assert module.config(a) == PipelineConfig()


def test_promote_defaults_are_the_config_defaults():
    from cars_ml.promotion.config import PromoteConfig

    module, a = _parsed("promote")
    assert module.config(a) == PromoteConfig()


def test_prepare_data_defaults_are_the_config_defaults():
    from cars_ml.data.types import DataConfig

    module, a = _parsed("prepare_data")
    assert module.config(a) == DataConfig()


def test_predict_defaults_are_the_config_defaults(tmp_path):
    from cars_ml.serving.predict import PredictConfig

    module, a = _parsed("predict", "--images", str(tmp_path))
    assert module.config(a) == PredictConfig(images=str(tmp_path))


def test_serve_defaults_are_the_config_defaults():
    from cars_ml.serving.run import ServeConfig

    module, a = _parsed("serve")
    assert module.config(a) == ServeConfig()


def test_benchmark_defaults_are_the_config_defaults():
    from cars_ml.perf.run import BenchmarkConfig

    module, a = _parsed("benchmark")
    assert module.config(a) == BenchmarkConfig()


@pytest.mark.parametrize(
    "script",
    [
        "main",
        "train",
        "distill",
        "tune",
        "promote",
        "prepare_data",
        "predict",
        "serve",
        "benchmark",
    ],
)
def test_every_entry_point_builds_its_config_in_one_function(script):
    assert callable(importlib.import_module(script).config)
