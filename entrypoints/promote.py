"""Entry point `promote`: move the `champion` alias to the best version within edge budgets.

python entrypoints/promote.py [--max_latency_ms 100] [--dry_run true] [--rollback true]
"""

from __future__ import annotations

import argparse

from _common import budget, device_name, fraction, parser, run_main, str2bool

from cars_ml import REGISTERED_MODEL_NAME
from cars_ml.promotion.policy import (
    DEVICE_PRECISIONS,
    RANKING_METRICS,
    SIZE_METRICS,
    Budgets,
    PromotionConfig,
)

_DEFAULTS = Budgets()


def slice_limit(value: str) -> float | None:
    """The slice guard: a number >= 0, or none/off/-1 to switch it off."""
    return None if str(value).strip() == "-1" else budget(value)


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model_name", default=REGISTERED_MODEL_NAME)
    p.add_argument("--metric", default="test_f1_macro", choices=RANKING_METRICS)
    p.add_argument(
        "--max_latency_ms", type=budget, default=_DEFAULTS.max_latency_ms, help="on latency_ms_p95"
    )
    p.add_argument(
        "--max_size_mb", type=budget, default=_DEFAULTS.max_size_mb, help="on size_metric"
    )
    p.add_argument("--size_metric", default=_DEFAULTS.size_metric, choices=SIZE_METRICS)
    p.add_argument("--max_int8_f1_drop", type=budget, default=_DEFAULTS.max_int8_f1_drop)
    p.add_argument(
        "--device", type=device_name, default=_DEFAULTS.device, help="an edge agent's device"
    )
    p.add_argument(
        "--max_device_latency_ms",
        type=budget,
        default=_DEFAULTS.max_device_latency_ms,
        help="on the p95 measured on --device",
    )
    p.add_argument(
        "--device_precision", default=_DEFAULTS.device_precision, choices=DEVICE_PRECISIONS
    )
    p.add_argument("--allow_estimates", type=str2bool, default=_DEFAULTS.allow_estimates)
    p.add_argument("--min_improvement", type=fraction, default=0.0)
    p.add_argument(
        "--max_slice_regression",
        type=slice_limit,
        default=None,
        help="largest macro-F1 loss on any make/body-type slice vs the champion (none/-1 = off)",
    )
    p.add_argument("--dry_run", type=str2bool, default=False)
    p.add_argument("--rollback", type=str2bool, default=False)
    p.add_argument(
        "--allow_old_serving_code",
        type=str2bool,
        default=False,
        help="let a version registered with serving code older than the minimum be champion",
    )
    return p


def config(args: argparse.Namespace) -> tuple[PromotionConfig, str]:
    """The ``PromotionConfig`` and the model name of parsed arguments."""
    budgets = Budgets(
        max_latency_ms=args.max_latency_ms,
        max_size_mb=args.max_size_mb,
        max_int8_f1_drop=args.max_int8_f1_drop,
        size_metric=args.size_metric,
        device=args.device,
        max_device_latency_ms=args.max_device_latency_ms,
        device_precision=args.device_precision,
        allow_estimates=args.allow_estimates,
    )
    return PromotionConfig(
        metric=args.metric,
        min_improvement=args.min_improvement,
        max_slice_regression=args.max_slice_regression,
        dry_run=args.dry_run,
        rollback=args.rollback,
        allow_old_serving_code=args.allow_old_serving_code,
        budgets=budgets,
    ), args.model_name


def main() -> None:
    from cars_ml.promotion.run import run_promote

    promotion, model_name = config(build_parser().parse_args())
    try:
        run_promote(promotion, model_name)
    except TimeoutError as exc:  # another promote holds the lock: one line, not a traceback
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    run_main(main)
