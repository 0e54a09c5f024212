"""The promotion policy on candidate tables: budgets, ranking, champion rules, rollback."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cars_ml import SERVING_CODE_VERSION
from cars_ml.promotion.policy import (
    IMPROVEMENT_TOLERANCE,
    Budgets,
    PromotionConfig,
    decide,
    evaluate,
)
from cars_ml.promotion.rollback import champion_stack, decide_rollback

NAN = math.nan


def _scaled(value, factor):
    return NAN if value is None or value != value else value * factor


def row(version, f1=0.8, p95=50.0, size=20.0, drop=0.01, **extra) -> dict:
    return {
        "version": str(version),
        "run_id": f"run{version}",
        "backbone": "mobilenet",
        "test_f1_macro": f1,
        "latency_ms_p50": _scaled(p95, 0.5),
        "latency_ms_p95": p95,
        "model_size_mb": size,
        "tflite_int8_size_mb": _scaled(size, 0.25),
        "int8_f1_drop": drop,
        "serving_code_version": SERVING_CODE_VERSION,
        **extra,
    }


def table(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def only(decision, version) -> pd.Series:
    return decision.table[decision.table["version"] == str(version)].iloc[0]


@pytest.mark.parametrize(
    ("candidate", "check", "reason"),
    [
        (row(1, p95=142.0), "latency", "latency_ms_p95 142.0 > max_latency_ms 100.0"),
        (row(1, size=88.4), "size", "model_size_mb 88.4 > max_size_mb 50.0"),
        (row(1, drop=0.12), "int8_f1_drop", "int8_f1_drop 0.12 > max_int8_f1_drop 0.05"),
        (row(1, p95=NAN), "latency", "latency_ms_p95 missing"),
        (row(1, size=None), "size", "model_size_mb missing"),
        (row(1, drop=NAN), "int8_f1_drop", "int8_f1_drop missing"),
        (row(1, f1=NAN), "metric", "test_f1_macro missing"),
        (row(1, excluded="rolled back at noon"), "excluded", "excluded: rolled back at noon"),
    ],
)
def test_each_budget_rules_a_version_out_with_its_reason(candidate, check, reason):
    decision = decide(table(candidate), None, PromotionConfig())
    r = only(decision, 1)
    assert not r[f"{check}_pass"]
    assert r[f"{check}_reason"] == reason
    assert r["fail_reasons"] == reason
    assert not r["eligible"]
    assert decision.action == "none_eligible"
    assert decision.challenger is None


def test_a_value_on_the_budget_passes_and_several_failures_are_all_listed():
    decision = decide(
        table(row(1, p95=100.0, size=50.0, drop=0.05), row(2, p95=101, size=51)),
        None,
        PromotionConfig(),
    )
    assert bool(only(decision, 1)["eligible"])
    assert only(decision, 2)["fail_reasons"] == (
        "latency_ms_p95 101.0 > max_latency_ms 100.0; model_size_mb 51.0 > max_size_mb 50.0"
    )


def test_size_budget_can_apply_to_the_int8_file_and_budgets_can_be_switched_off():
    big = row(1, size=88.0, p95=500.0)  # int8 file 22 MB
    config = PromotionConfig(
        budgets=Budgets(size_metric="tflite_int8_size_mb", max_latency_ms=None)
    )
    decision = decide(table(big), None, config)
    assert decision.action == "promote" and decision.challenger == "1"
    assert only(decision, 1)["latency_reason"] == ""


def test_best_metric_among_passing_versions_wins_even_if_a_failing_one_is_better():
    candidates = table(row(1, f1=0.70), row(2, f1=0.95, p95=300.0), row(3, f1=0.80))
    decision = decide(candidates, None, PromotionConfig())
    assert decision.action == "promote"
    assert decision.challenger == "3"
    assert "no champion yet" in decision.reason
    assert decision.table["rank"].tolist()[::2] == [2, 1]
    assert decision.table["rank"].isna().tolist() == [False, True, False]


def test_ties_go_to_lower_p95_latency():
    candidates = table(row(1, f1=0.8, p95=60.0), row(2, f1=0.8, p95=40.0), row(3, f1=0.8, p95=90.0))
    assert decide(candidates, None, PromotionConfig()).challenger == "2"


def test_full_tie_keeps_the_champion_rather_than_churning():
    candidates = table(row(1, f1=0.8, p95=40.0), row(2, f1=0.8, p95=40.0))
    decision = decide(candidates, "1", PromotionConfig())
    assert decision.action == "keep" and decision.challenger == "1"


def test_champion_not_beaten_by_min_improvement_is_kept():
    candidates = table(row(1, f1=0.800), row(2, f1=0.805))
    decision = decide(candidates, "1", PromotionConfig(min_improvement=0.01))
    assert decision.action == "keep"
    assert decision.challenger == "2"
    assert decision.new_champion == "1"
    assert "only test_f1_macro +0.005 (< min_improvement 0.01)" in decision.reason


def test_champion_beaten_by_exactly_min_improvement_is_replaced_despite_float_noise():
    # 0.83 - 0.82 is 0.00999999... in floating point.
    decision = decide(
        table(row(1, f1=0.82), row(2, f1=0.83)), "1", PromotionConfig(min_improvement=0.01)
    )
    assert decision.action == "promote" and decision.new_champion == "2"
    assert decision.improvement == pytest.approx(0.01)


def test_champion_failing_a_budget_now_is_replaced_by_any_passing_version():
    candidates = table(row(1, f1=0.90, p95=180.0), row(2, f1=0.70))
    decision = decide(candidates, "1", PromotionConfig(min_improvement=0.5))
    assert decision.action == "promote" and decision.challenger == "2"
    assert (
        "champion v1 fails its budgets (latency_ms_p95 180.0 > max_latency_ms 100.0)"
        in decision.reason
    )


def test_champion_missing_from_the_registry_is_replaced():
    decision = decide(table(row(2)), "1", PromotionConfig(min_improvement=0.5))
    assert decision.action == "promote"
    assert "champion v1 is not in the registry" in decision.reason


def test_nothing_eligible_leaves_the_champion_alone():
    decision = decide(table(row(1, p95=500.0), row(2, size=900.0)), "1", PromotionConfig())
    assert decision.action == "none_eligible"
    assert decision.new_champion == "1"
    assert decision.reason == "No version of 2 passes the budgets; champion v1 stays."


def test_dry_run_decides_the_same_but_says_it_changes_nothing():
    candidates = table(row(1, f1=0.7), row(2, f1=0.9))
    real = decide(candidates, "1", PromotionConfig())
    dry = decide(candidates, "1", PromotionConfig(dry_run=True))
    assert (dry.action, dry.challenger) == (real.action, real.challenger) == ("promote", "2")
    assert dry.reason.endswith("(dry run: registry unchanged).")
    assert real.changes_registry and not dry.changes_registry
    assert dry.new_champion == "1"


def test_empty_registry_gives_the_command_to_fix_it():
    with pytest.raises(
        ValueError, match=r"train and register a model first: `mlflow run . -e train"
    ):
        decide(pd.DataFrame(columns=["version", "test_f1_macro"]), None, PromotionConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "latency_ms_p95"}, "metric must be one of"),
        ({"min_improvement": -0.1}, "min_improvement must be"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromotionConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_latency_ms": -1.0}, "max_latency_ms must be a number >= 0"),
        ({"max_size_mb": math.inf}, "max_size_mb must be a number >= 0"),
        ({"size_metric": "disk"}, "size_metric must be one of"),
    ],
)
def test_bad_budgets_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budgets(**kwargs)


def promote_event(version, previous=None):
    return {"action": "promote", "version": str(version), "previous": previous}


def rollback_event(version, previous):
    return {"action": "rollback", "version": str(version), "previous": str(previous)}


@pytest.mark.parametrize(
    ("history", "current", "target"),
    [
        ([promote_event(1), promote_event(2, "1")], "2", "1"),
        ([promote_event(1), promote_event(2, "1"), promote_event(3, "2")], "3", "2"),
        # Rolling back twice walks further back instead of toggling.
        (
            [promote_event(1), promote_event(2, "1"), promote_event(3, "2"), rollback_event(2, 3)],
            "2",
            "1",
        ),
        # History that starts after a champion existed (trimmed or hand-set alias).
        ([promote_event(5, "4")], "5", "4"),
        # The alias was moved by hand: restore the last champion promote recorded.
        ([promote_event(1), promote_event(2, "1")], "7", "2"),
        ([promote_event(1), promote_event(2, "1")], None, "2"),
    ],
)
def test_rollback_targets_the_previous_champion(history, current, target):
    plan = decide_rollback(history, current)
    assert plan.target == target
    assert plan.from_version == current


@pytest.mark.parametrize(
    ("history", "current", "message"),
    [
        ([], "1", "no champion_history"),
        ([promote_event(1)], "1", "v1 is the first champion"),
        ([promote_event(1), promote_event(2, "1"), rollback_event(1, 2)], "1", "v1 is the first"),
    ],
)
def test_rollback_with_nothing_earlier_explains_why(history, current, message):
    with pytest.raises(ValueError, match=message):
        decide_rollback(history, current)


def test_champion_stack_replays_promotions_and_rollbacks():
    events = [promote_event(1), promote_event(2, "1"), rollback_event(1, 2), promote_event(3, "1")]
    assert champion_stack(events) == ["1", "3"]


# ---- properties ---------------------------------------------------------------------------

maybe = st.one_of(st.none(), st.just(NAN), st.floats(0, 300, allow_nan=False))
candidate_rows = st.lists(
    st.tuples(
        st.one_of(st.just(NAN), st.sampled_from([0.5, 0.6, 0.7, 0.8, 0.9]), st.floats(0, 1)),
        maybe,
        maybe,
        st.one_of(st.just(NAN), st.floats(-0.1, 0.3)),
    ),
    min_size=1,
    max_size=8,
)
configs = st.builds(
    PromotionConfig,
    min_improvement=st.sampled_from([0.0, 0.01, 0.05]) | st.floats(0, 0.5),
    budgets=st.builds(
        Budgets,
        max_latency_ms=st.none() | st.floats(0, 300),
        max_size_mb=st.none() | st.floats(0, 300),
        max_int8_f1_drop=st.none() | st.floats(0, 0.2),
    ),
)


def _passes(r, budgets: Budgets) -> bool:
    def within(value, limit):
        return limit is None or (value is not None and value == value and value <= limit)

    return (
        r["test_f1_macro"] == r["test_f1_macro"]
        and within(r["latency_ms_p95"], budgets.max_latency_ms)
        and within(r["model_size_mb"], budgets.max_size_mb)
        and within(r["int8_f1_drop"], budgets.max_int8_f1_drop)
    )


@settings(max_examples=150, deadline=None)
@given(rows=candidate_rows, config=configs, champion_index=st.integers(-1, 8))
def test_policy_properties(rows, config, champion_index):
    candidates = table(
        *(row(i + 1, f1=f, p95=p, size=s, drop=d) for i, (f, p, s, d) in enumerate(rows))
    )
    champion = str(champion_index + 1) if 0 <= champion_index < len(rows) else None
    decision = decide(candidates, champion, config)
    records = {r["version"]: r for r in candidates.to_dict("records")}
    passing = [r for r in records.values() if _passes(r, config.budgets)]
    # The evaluated eligibility agrees with an independent reading of the budgets.
    assert sorted(decision.table.loc[decision.table["eligible"], "version"]) == sorted(
        r["version"] for r in passing
    )
    if decision.challenger is None:
        assert not passing and decision.action == "none_eligible"
        return
    best = records[decision.challenger]
    # The challenger passes every budget, and no passing version has a strictly better metric.
    assert _passes(best, config.budgets)
    assert all(r["test_f1_macro"] <= best["test_f1_macro"] for r in passing)
    champ = records.get(champion) if champion else None
    if decision.action == "promote" and champ is not None and _passes(champ, config.budgets):
        improvement = best["test_f1_macro"] - champ["test_f1_macro"]
        assert improvement >= config.min_improvement - IMPROVEMENT_TOLERANCE
    if decision.action == "keep":
        assert champ is not None and _passes(champ, config.budgets)
    assert decision.new_champion in {champion, decision.challenger}


def test_evaluate_requires_a_version_column():
    with pytest.raises(ValueError, match="'version' column"):
        evaluate(pd.DataFrame({"test_f1_macro": [0.5]}), PromotionConfig())


@settings(max_examples=150, deadline=None)
@given(
    f1s=st.lists(
        st.sampled_from([0.5, 0.6, 0.7, 0.75, 0.8, 0.9]) | st.floats(0, 1), min_size=2, max_size=6
    ),
    latencies=st.lists(st.floats(1, 99), min_size=6, max_size=6),
    min_improvement=st.sampled_from([0.0, 0.01, 0.05, 0.1]) | st.floats(0, 0.5),
    champion_index=st.integers(0, 5),
)
def test_an_eligible_champion_is_replaced_only_by_min_improvement(
    f1s, latencies, min_improvement, champion_index
):
    candidates = table(*(row(i + 1, f1=f, p95=latencies[i]) for i, f in enumerate(f1s)))
    champion = str(champion_index % len(f1s) + 1)
    decision = decide(candidates, champion, PromotionConfig(min_improvement=min_improvement))
    best = max(f1s)
    champ_f1 = f1s[int(champion) - 1]
    assert decision.action in ("promote", "keep")
    assert decision.table.loc[decision.table["is_challenger"], "test_f1_macro"].item() == best
    if decision.action == "promote":
        assert best - champ_f1 >= min_improvement - IMPROVEMENT_TOLERANCE
        assert decision.improvement == pytest.approx(best - champ_f1)
    elif best - champ_f1 >= min_improvement and decision.challenger != champion:
        pytest.fail(f"kept v{champion} although the challenger beats it by {best - champ_f1}")


PI = "device_pi5_int8_latency_ms_p95"


def _device_config(**budgets) -> PromotionConfig:
    return PromotionConfig(budgets=Budgets(device="pi5", max_device_latency_ms=40.0, **budgets))


def test_a_device_budget_reads_the_device_measurement_not_this_host():
    # v1 is fast here but slow on the Pi; v2 the other way round.
    candidates = table(
        row(1, f1=0.9, p95=5.0, **{PI: 80.0}), row(2, f1=0.8, p95=500.0, **{PI: 30.0})
    )
    decision = decide(candidates, None, _device_config())
    assert decision.challenger == "2"
    assert only(decision, 1)["fail_reasons"] == f"{PI} 80.0 > max_device_latency_ms 40.0"
    assert "p95 on pi5 (int8) 30.0 ms measured" in decision.reason


def test_a_version_not_measured_on_the_device_is_ruled_out_unless_estimates_are_allowed():
    candidates = table(
        row(1, f1=0.8, **{PI: 30.0}),
        row(2, f1=0.95, **{"est_pi5_int8_latency_ms": 20.0}),
        row(3, f1=0.99, **{"est_pi5_int8_latency_ms": 90.0}),
    )
    strict = decide(candidates, None, _device_config())
    assert strict.challenger == "1"
    assert only(strict, 2)["fail_reasons"] == "not measured on pi5: run the edge agent there"
    loose = decide(candidates, None, _device_config(allow_estimates=True))
    assert loose.challenger == "2"
    assert only(loose, 2)["device_latency_source"] == "estimate"
    assert "estimated" in loose.reason
    assert "(estimate: not measured on pi5)" in only(loose, 3)["fail_reasons"]


def test_device_float32_and_bad_device_settings():
    candidates = table(row(1, **{"device_pi5_float32_latency_ms_p95": 35.0}))
    decision = decide(candidates, None, _device_config(device_precision="float32"))
    assert decision.challenger == "1"
    with pytest.raises(ValueError, match="device name"):
        Budgets(device="Pi 5")
    with pytest.raises(ValueError, match="device_precision"):
        Budgets(device="pi5", device_precision="fp16")


def test_estimates_scale_host_latency_by_the_two_peaks():
    from cars_ml.measure.estimate import estimate_latencies, profile_peaks

    run = {"tflite_int8_latency_ms_p50": 4.0, "host_peak_int8_gmacs": 200.0}
    peaks = profile_peaks({"peak_int8_gmacs_t1": 50.0, "peak_int8_gmacs": 150.0})
    assert peaks == {"int8": 50.0}
    assert estimate_latencies(run, {"pi5": peaks}) == {"est_pi5_int8_latency_ms": 16.0}
    assert estimate_latencies({"tflite_int8_latency_ms_p50": 4.0}, {"pi5": peaks}) == {}


AUDI, BMW = "slice_make_audi_f1_macro", "slice_body_type_sedan_f1_macro"


def test_slice_guard_keeps_a_champion_a_better_challenger_loses_a_slice_to():
    candidates = table(
        row(1, f1=0.80, **{AUDI: 0.81, BMW: 0.70}),
        row(2, f1=0.85, **{AUDI: 0.62, BMW: 0.90}),
    )
    config = PromotionConfig(max_slice_regression=0.05)
    decision = decide(candidates, "1", config)
    assert decision.action == "keep" and decision.new_champion == "1"
    assert "slice make=audi f1 0.62 < champion v1 0.81 - 0.05" in decision.reason
    assert not only(decision, 2)["eligible"] and only(decision, 1)["slice_pass"]
    # Off by default, and a loss within the limit passes.
    assert decide(candidates, "1", PromotionConfig()).action == "promote"
    assert decide(candidates, "1", PromotionConfig(max_slice_regression=0.2)).action == "promote"


def test_slice_guard_falls_to_the_next_challenger_that_holds_every_slice():
    candidates = table(
        row(1, f1=0.80, **{AUDI: 0.81, BMW: 0.70}),
        row(2, f1=0.90, **{AUDI: 0.50, BMW: 0.95}),
        row(3, f1=0.84, **{AUDI: 0.80, BMW: 0.72}),
    )
    decision = decide(candidates, "1", PromotionConfig(max_slice_regression=0.05))
    assert decision.action == "promote" and decision.challenger == "3"
    assert "slice guard ruled out v2 (slice make=audi" in decision.reason
    assert (
        "body_type=sedan"
        in only(
            decide(
                table(row(1, **{BMW: 0.9}), row(2, f1=0.9, **{BMW: 0.1})),
                "1",
                PromotionConfig(max_slice_regression=0.0),
            ),
            2,
        )["fail_reasons"]
    )


def test_slice_guard_needs_a_champion_and_a_valid_limit():
    candidates = table(row(2, f1=0.85, **{AUDI: 0.1}))
    assert decide(candidates, None, PromotionConfig(max_slice_regression=0.0)).action == "promote"
    with pytest.raises(ValueError, match="max_slice_regression"):
        PromotionConfig(max_slice_regression=-0.1)


def test_a_version_with_old_serving_code_cannot_become_or_stay_champion():
    """A version registered before the request guard's fixes (no record: 0) is ruled out,
    champion or not, unless the override says otherwise."""
    old = row(3, f1=0.95, serving_code_version=NAN)
    decision = decide(table(row(1, f1=0.7), row(2, f1=0.8), old), "3", PromotionConfig())
    assert decision.action == "promote" and decision.challenger == "2"
    assert "serving_code_version 0 < " in only(decision, 3)["fail_reasons"]
    assert "champion v3 fails its budgets" in decision.reason
    allowed = decide(table(row(2), old), "2", PromotionConfig(allow_old_serving_code=True))
    assert allowed.challenger == "3"
