"""The ``promote`` step's configuration: each field is also its parameter (and ``main``'s
budgets). No pandas, no MLflow: an entry point builds its parser from it at once."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import cars_ml
from cars_ml.params import budget, fraction, nested, param

# Higher is better for every metric a promotion may rank by.
RANKING_METRICS = (
    "test_f1_macro",
    "test_f1_weighted",
    "test_accuracy",
    "test_top5_accuracy",
    "tflite_int8_test_f1_macro",
    "throughput_img_per_s",
)
SIZE_METRICS = ("model_size_mb", "tflite_int8_size_mb")
LATENCY_METRIC = "latency_ms_p95"
INT8_DROP_METRIC = "int8_f1_drop"
DEVICE_PRECISIONS = ("int8", "float32")
DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def device_name(value: str) -> str | None:
    """An edge agent's device name, or empty for none."""
    text = str(value).strip()
    if not text:
        return None
    if not DEVICE_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device name: lower case letters, digits, '-' and '_' (at most "
            "40), as given to cars-ml-edge --device"
        )
    return text


def slice_limit(value: str) -> float | None:
    """The slice guard: a number >= 0, or none/off/-1 to switch it off."""
    return None if str(value).strip() == "-1" else budget(value)


@dataclass(frozen=True)
class Budgets:
    """Edge budgets; ``None`` switches one off. Defaults suit a Raspberry Pi-class device.

    ``max_latency_ms`` bounds ``latency_ms_p95``; ``max_size_mb`` bounds ``size_metric``
    (``model_size_mb`` or ``tflite_int8_size_mb``); ``max_int8_f1_drop`` bounds
    ``int8_f1_drop`` (float test macro-F1 minus int8). With ``device`` (an edge agent's device
    name), ``max_device_latency_ms`` bounds the p95 measured there for ``device_precision``
    in place of ``max_latency_ms``; ``allow_estimates`` accepts the profile's estimate for a
    version not measured there.
    """

    max_latency_ms: float | None = param(
        100.0, "on latency_ms_p95, the served model's (none: off)", parse=budget
    )
    max_size_mb: float | None = param(50.0, "on size_metric (none: off)", parse=budget)
    max_int8_f1_drop: float | None = param(
        0.05, "float minus int8 test macro-F1 at most (none: off)", parse=budget
    )
    size_metric: str = param("model_size_mb", "the size the budget reads", choices=SIZE_METRICS)
    device: str | None = param(
        None, "an edge agent's device: its measured latency instead", parse=device_name
    )
    max_device_latency_ms: float | None = param(
        100.0, "on the p95 measured on device (none: off)", parse=budget
    )
    device_precision: str = param("int8", "which file's device latency", choices=DEVICE_PRECISIONS)
    allow_estimates: bool = param(False, "accept the device profile's estimate when unmeasured")

    def __post_init__(self) -> None:
        for name in ("max_latency_ms", "max_size_mb", "max_int8_f1_drop", "max_device_latency_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{name} must be a number >= 0 (or None to switch it off), got {value!r}"
                )
        if self.size_metric not in SIZE_METRICS:
            raise ValueError(f"size_metric must be one of {SIZE_METRICS}, got {self.size_metric!r}")
        if self.device is not None and not DEVICE_NAME.match(self.device):
            raise ValueError(
                f"device must be an edge agent's device name (lower case letters, digits, '-' "
                f"and '_', at most 40), got {self.device!r}"
            )
        if self.device_precision not in DEVICE_PRECISIONS:
            raise ValueError(
                f"device_precision must be one of {DEVICE_PRECISIONS}, got {self.device_precision!r}"
            )

    @property
    def device_column(self) -> str:
        """The measured p95 the device budget reads (the edge agent's metric)."""
        return f"device_{self.device}_{self.device_precision}_latency_ms_p95"

    @property
    def estimate_column(self) -> str:
        return f"est_{self.device}_{self.device_precision}_latency_ms"

    def checks(self) -> list[tuple[str, str, str, float | None]]:
        """(check name, metric column, budget name, limit) for each budget."""
        latency = ("latency", LATENCY_METRIC, "max_latency_ms", self.max_latency_ms)
        if self.device:
            latency = (
                "device_latency",
                self.device_column,
                "max_device_latency_ms",
                self.max_device_latency_ms,
            )
        return [
            latency,
            ("size", self.size_metric, "max_size_mb", self.max_size_mb),
            ("int8_f1_drop", INT8_DROP_METRIC, "max_int8_f1_drop", self.max_int8_f1_drop),
        ]


@dataclass(frozen=True)
class PromotionConfig:
    """What ``promote`` does: rank by ``metric`` under ``budgets``, or roll back."""

    metric: str = param("test_f1_macro", "the metric to rank by", choices=RANKING_METRICS)
    min_improvement: float = param(
        0.0, "how much a challenger must beat the champion by", parse=fraction
    )
    dry_run: bool = param(False, "print the decision, move nothing")
    rollback: bool = param(False, "move the alias back to the previous champion")
    # Let versions registered with serving code older than the minimum compete (and roll back).
    allow_old_serving_code: bool = param(
        False, "let a version registered with serving code older than the minimum be champion"
    )
    budgets: Budgets = nested(Budgets)
    # Largest macro-F1 loss on any slice against the champion (None = off).
    max_slice_regression: float | None = param(
        None,
        "largest macro-F1 loss on any make/body-type slice vs the champion (none/-1 = off)",
        parse=slice_limit,
        text="none",
    )

    def __post_init__(self) -> None:
        limit = self.max_slice_regression
        if limit is not None and not (math.isfinite(limit) and limit >= 0):
            raise ValueError(
                f"max_slice_regression must be a number >= 0 (or None to switch it off), "
                f"got {limit!r}"
            )
        if self.metric not in RANKING_METRICS:
            raise ValueError(
                f"metric must be one of {RANKING_METRICS} (higher is better), got {self.metric!r}"
            )
        if not (math.isfinite(self.min_improvement) and self.min_improvement >= 0):
            raise ValueError(f"min_improvement must be a number >= 0, got {self.min_improvement!r}")


@dataclass(frozen=True)
class PromoteConfig:
    """Everything the ``promote`` entry point controls: which registered model, and how."""

    model_name: str = param(cars_ml.REGISTERED_MODEL_NAME, "registered model name")
    promotion: PromotionConfig = nested(PromotionConfig)
