"""MLproject entry point ``prepare_data``: validate a dataset and log its summary to MLflow."""

from __future__ import annotations

from _common import fraction, non_negative_int, parser, run_main, str2bool


def build_parser():
    p = parser("Validate a dataset (synthetic, Stanford Cars or image folders) and log it.")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset root path")
    p.add_argument("--val_fraction", type=fraction, default=0.15, help="share for validation")
    p.add_argument("--test_fraction", type=fraction, default=0.15, help="held-out test share")
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--crop_to_bbox", type=str2bool, default=True)
    p.add_argument("--skip_bad_images", type=str2bool, default=False)
    p.add_argument("--max_classes", type=non_negative_int, default=0, help="0 keeps all")
    p.add_argument("--max_per_class", type=non_negative_int, default=0, help="0 means no cap")
    return p


def config(a):
    """The ``DataConfig`` of parsed arguments."""
    from cars_ml.data.types import DataConfig

    return DataConfig(**vars(a))


def main() -> None:
    a = build_parser().parse_args()
    from cars_ml.data.run import run_prepare_data

    run_prepare_data(config(a))


if __name__ == "__main__":
    run_main(main)
