"""The project's own files agree: MLproject vs the config dataclasses and the entry-point parsers
derived from them, conda.yaml vs pyproject pins."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "entrypoints"))

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def _script(entry: dict) -> str:
    match = re.search(r"python entrypoints/(\w+)\.py", entry["command"])
    assert match, f"command does not run an entry-point script: {entry['command']}"
    return match.group(1)


def test_required_top_level_layout():
    for name in (
        "MLproject",
        "conda.yaml",
        "README.md",
        "cars_ml",
        "entrypoints",
        "tests",
        "deploy",
        "pyproject.toml",
        ".ci/run",
    ):
        assert (ROOT / name).exists(), f"{name} is missing"
    assert MLPROJECT["conda_env"] == "conda.yaml"
    for sub in ("code", "data", "model", "e2e"):
        assert (ROOT / "tests" / sub).is_dir()


def test_mlproject_is_rendered_from_the_config_dataclasses():
    import _common

    assert (ROOT / "MLproject").read_text() == _common.mlproject(), (
        "MLproject is out of date with the config dataclasses: run `python entrypoints/_common.py`"
    )
    assert sorted(ENTRY_POINTS) == sorted(_common.ENTRY_POINTS)


def test_a_new_field_is_a_parameter_of_every_entry_point_of_its_config(monkeypatch):
    # What adding a hyperparameter takes: one field. It reaches train's and distill's parsers,
    # their MLproject blocks and the built config, and tune's (which has no HParams) not at all.
    import dataclasses

    import _common

    from cars_ml.params import param, positive_float
    from cars_ml.training import config as train_config
    from cars_ml.training import hparams

    field = ("mixup", float, param(0.0, "mixup strength", parse=positive_float))
    grown = dataclasses.make_dataclass("HParams", [field], bases=(hparams.HParams,), frozen=True)
    monkeypatch.setattr(
        train_config.TrainConfig.__dataclass_fields__["hparams"],
        "metadata",
        {
            **train_config.TrainConfig.__dataclass_fields__["hparams"].metadata,
            "cars_ml.nested": (grown, None),
        },
    )
    text = _common.mlproject()
    train = importlib.import_module("train")
    assert "mixup: {type: float, default: 0.0}" in text and "--mixup {mixup}" in text
    cfg = train.config(train.build_parser().parse_args(["--mixup", "0.2"]))
    assert cfg.hparams.mixup == 0.2
    assert yaml.safe_load(text)["entry_points"]["distill"]["parameters"]["mixup"]
    assert "mixup" not in yaml.safe_load(text)["entry_points"]["tune"]["parameters"]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_mlproject_matches_the_entry_point_parser(name):
    entry = ENTRY_POINTS[name]
    parser = importlib.import_module(_script(entry)).build_parser()
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    params = entry.get("parameters", {})
    assert set(params) == set(options), f"{name}: MLproject and parser disagree"
    for key, spec in params.items():
        assert "type" in spec and "default" in spec, f"{name}.{key} needs a type and a default"
        assert f"--{key} {{{key}}}" in entry["command"], f"{name}.{key} missing from the command"
        # The MLproject default, parsed like MLflow would pass it, equals the parser's default.
        action = options[key]
        raw = str(spec["default"])
        parsed = action.type(raw) if action.type else raw
        assert parsed == action.default, (
            f"{name}.{key}: MLproject {raw!r} vs parser {action.default!r}"
        )


def test_conda_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pins = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(pins) == sorted(project)
    assert all("==" in p for p in project), "every runtime dependency is pinned"
