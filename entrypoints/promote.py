"""Entry point `promote`: move the `champion` alias to the best version within edge budgets.

python entrypoints/promote.py [--max_latency_ms 100] [--dry_run true] [--rollback true]
"""

from __future__ import annotations

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.promotion.config import PromoteConfig

ENTRY = Entry("promote", PromoteConfig, __doc__.splitlines()[0])


def build_parser():
    return parser(ENTRY)


def config(a) -> PromoteConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())
    from cars_ml.promotion.run import run_promote

    try:
        run_promote(cfg.promotion, cfg.model_name)
    except TimeoutError as exc:  # another promote holds the lock: one line, not a traceback
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    run_main(main)
