"""Which model of a pipeline run teaches, and which backbones learn from it. Pure: rows in,
a plan out (``cars_ml.pipeline.run`` runs it)."""

from __future__ import annotations

import math

from cars_ml.promotion.policy import Budgets, metric_value


def student_name(student: str, teacher: str) -> str:
    """The comparison's name of a student: ``mobilenet-from-xception`` (a valid metric key)."""
    return f"{student}-from-{teacher}"


def plan_distillation(
    rows: list[dict], budgets: Budgets, students: tuple[str, ...] = ()
) -> tuple[dict | None, list[str], str]:
    """Pick the teacher and the students of a run's trained backbones; pure.

    ``rows`` hold ``backbone``, ``model_version`` and the train metrics. The teacher is the
    registered version with the best ``val_f1_macro`` (chosen on validation, so the test split
    stays unseen by every choice), whatever its size (ties: the faster one). The students are ``students`` when given,
    else every other backbone within the size and latency budgets. Returns
    ``(teacher row or None, students, why none)``.
    """
    ranked = [
        r
        for r in rows
        if r.get("model_version") and metric_value(r["metrics"], "val_f1_macro") is not None
    ]
    if not ranked:
        return None, [], "no registered version with a validation macro-F1 to teach"
    teacher = min(
        ranked,
        key=lambda r: (
            -r["metrics"]["val_f1_macro"],
            metric_value(r["metrics"], "latency_ms_p95") or math.inf,
            int(r["model_version"]),
        ),
    )
    if students:
        chosen = list(students)
    else:
        checks = [
            (metric, limit)
            for name, metric, _, limit in budgets.checks()
            if name in ("size", "latency") and limit is not None
        ]
        chosen = [
            r["backbone"]
            for r in rows
            if r["backbone"] != teacher["backbone"]
            and all((metric_value(r["metrics"], m) or math.inf) <= limit for m, limit in checks)
        ]
    if not chosen:
        return teacher, [], "no other backbone passes the size and latency budgets"
    return teacher, chosen, ""
