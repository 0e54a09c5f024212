"""The tuning search space, in one place (documented in docs/tuning.md).

A pure decision: given an Optuna trial and the values the user pinned, return the
hyperparameters of one trial. Pinned values are not sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna


@dataclass(frozen=True)
class Dimension:
    kind: str  # "log" (float, log scale), "float" or "choice"
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    fine_tune_only: bool = False  # has no effect when only a head trains on cached features
    distill_only: bool = False  # only searched in a distillation study (a teacher is given)


SEARCH_SPACE: dict[str, Dimension] = {
    "learning_rate": Dimension("log", 1e-4, 1e-2),
    "fine_tune_learning_rate": Dimension("log", 1e-5, 1e-3, fine_tune_only=True),
    "dropout": Dimension("float", 0.0, 0.6),
    "head_units": Dimension("choice", choices=(0, 128, 256, 512)),
    "label_smoothing": Dimension("float", 0.0, 0.2),
    # The fine-tuning shares the batch size, which a head trained on cached features cannot
    # judge: a larger batch there means fewer fine-tuning steps.
    "batch_size": Dimension("choice", choices=(16, 32, 64), fine_tune_only=True),
    "unfreeze_fraction": Dimension("float", 0.0, 1.0, fine_tune_only=True),
    "augment_strength": Dimension("float", 0.0, 1.0, fine_tune_only=True),
    "weight_decay": Dimension("log", 1e-6, 1e-3),
    "temperature": Dimension("log", 1.0, 10.0, distill_only=True),
    "alpha": Dimension("float", 0.0, 1.0, distill_only=True),
}


def parse_pins(text: str) -> dict[str, Any]:
    """Parse ``"dropout=0.2,head_units=256"`` into typed pinned values, refusing unknown names."""
    pins: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in SEARCH_SPACE:
            valid = ", ".join(SEARCH_SPACE)
            raise ValueError(f"Cannot pin {item!r}: expected name=value with name in {valid}.")
        dim = SEARCH_SPACE[name]
        value: Any = float(raw)
        if dim.kind == "choice":
            value = type(dim.choices[0])(value)
        pins[name] = value
    return pins


def _skipped(dim: Dimension, head_only: bool, distill: bool) -> bool:
    return (head_only and dim.fine_tune_only) or (dim.distill_only and not distill)


def sample(
    trial: optuna.Trial, pins: dict[str, Any], *, head_only: bool, distill: bool = False
) -> dict[str, Any]:
    """Sample one trial's hyperparameters; pinned and (in head-only mode) fine-tune-only ones
    are fixed, so every trial's params show what really varied. ``temperature`` and ``alpha``
    are searched only in a distillation study (``distill``)."""
    params: dict[str, Any] = {}
    for name, dim in SEARCH_SPACE.items():
        if name in pins:
            params[name] = pins[name]
        elif _skipped(dim, head_only, distill):
            continue
        elif dim.kind == "log":
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=True)
        elif dim.kind == "float":
            params[name] = trial.suggest_float(name, dim.low, dim.high)
        else:
            params[name] = trial.suggest_categorical(name, list(dim.choices))
    return params


def baseline(pins: dict[str, Any], *, head_only: bool, distill: bool = False) -> dict[str, Any]:
    """The training defaults (``HParams``) as a point of the search space, for trial 0.

    Evaluated first, they guarantee a study never recommends worse than the defaults, which
    matters most for small budgets where a few random draws can all land badly. Values outside
    a dimension's range are clamped to it (weight decay 0 becomes its lowest value).
    """
    from cars_ml.training.hparams import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, HParams

    defaults = {**HParams().as_params(), "temperature": DEFAULT_TEMPERATURE, "alpha": DEFAULT_ALPHA}
    point: dict[str, Any] = {}
    for name, dim in SEARCH_SPACE.items():
        if name in pins or _skipped(dim, head_only, distill):
            continue
        value = defaults[name]
        if dim.kind == "choice":
            point[name] = value if value in dim.choices else dim.choices[0]
        else:
            point[name] = min(max(value, dim.low), dim.high)
    return point
