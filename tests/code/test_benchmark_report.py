"""The benchmark's section parsing, configuration checks, goals and markdown table."""

from __future__ import annotations

import math

import pytest

from cars_ml.perf import report
from cars_ml.perf.run import SECTIONS, BenchmarkConfig, parse_sections


def test_sections_parse_all_and_lists_in_fixed_order_and_refuse_unknown_names():
    assert parse_sections("all") == SECTIONS
    assert parse_sections(" tuning , inference ") == ("inference", "tuning")
    with pytest.raises(ValueError, match="unknown benchmark section"):
        parse_sections("inference,gpu")


def test_every_section_has_its_measurement():
    from cars_ml.perf.run import _SECTIONS

    assert tuple(_SECTIONS) == SECTIONS


@pytest.mark.parametrize(
    "bad", [{"image_size": 16}, {"runs": 0}, {"serve_seconds": 0}, {"sections": ("edge", "x")}]
)
def test_config_refuses_bad_budgets(bad):
    with pytest.raises(ValueError):
        BenchmarkConfig(**bad)


def test_goals_pass_and_miss_at_their_thresholds():
    goals = report.GOALS
    assert goals["speedup_vs_keras_predict"].met(6.0)
    assert not goals["speedup_vs_keras_predict"].met(5.99)
    assert goals["serve_p50_ms"].met(14.9) and not goals["serve_p50_ms"].met(15.0)
    assert goals["serve_errors"].met(0.0) and not goals["serve_errors"].met(1.0)
    assert goals["int8_latency_over_floor"].met(3.0)
    assert not goals["tuning_trial_speedup_cached_features"].met(math.nan)


def test_table_lists_every_metric_with_goal_and_verdict():
    metrics = {"speedup_vs_keras_predict": 7.5, "serve_p50_ms": 21.0, "model_macs": 5.68e8}
    info = {"cpu_model": "Test CPU", "cpu_cores": "2", "date_utc": "2026-11-25 06:00"}
    table = report.markdown_table(metrics, info)
    assert "Test CPU, 2 cores, 2026-11-25 06:00 UTC" in table
    assert "| `speedup_vs_keras_predict` | 7.50 | >= 6x | pass |" in table
    assert "| `serve_p50_ms` | 21.00 | < 15 | **miss** |" in table
    assert "| `model_macs` | 568 M |  |  |" in table
    assert report.goal_summary(metrics) == {"speedup_vs_keras_predict": True, "serve_p50_ms": False}
