"""MLproject entry point `train`: train, evaluate, benchmark, export and register one backbone."""

from _common import (
    fraction,
    non_negative_int,
    parser,
    positive_float,
    positive_int,
    run_main,
    str2bool,
)

from cars_ml import AUTO_SIZE


def image_size(value: str) -> int:
    """``auto`` (native size, or a small one for synthetic data), 0 (native) or pixels."""
    return AUTO_SIZE if value.strip().lower() == "auto" else non_negative_int(value)


def build_parser():
    p = parser("Train one backbone on Stanford Cars (or synthetic) and log it to MLflow.")
    p.add_argument("--model", default="mobilenet", help="backbone name")
    p.add_argument(
        "--data", default="synthetic", help="synthetic, a Stanford Cars root or image folder"
    )
    p.add_argument("--weights", default="auto", help="auto, imagenet, none or a weights file")
    p.add_argument("--image_size", type=image_size, default=AUTO_SIZE, help="auto, 0=native or px")
    p.add_argument("--epochs", type=positive_int, default=8, help="phase-1 (head) epochs")
    p.add_argument("--fine_tune_epochs", type=non_negative_int, default=4)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--learning_rate", type=positive_float, default=1e-3)
    p.add_argument("--fine_tune_learning_rate", type=positive_float, default=1e-4)
    p.add_argument("--dropout", type=fraction, default=0.3)
    p.add_argument("--head_units", type=non_negative_int, default=0, help="0 = no hidden layer")
    p.add_argument("--label_smoothing", type=fraction, default=0.1)
    p.add_argument("--unfreeze_fraction", type=fraction, default=0.3)
    p.add_argument("--augment_strength", type=fraction, default=0.3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--patience", type=positive_int, default=3)
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--register", type=str2bool, default=True)
    p.add_argument("--model_name", default="stanford-cars-classifier")
    p.add_argument("--export_tflite", type=str2bool, default=True)
    p.add_argument("--params_from", default="", help="an Optuna study name to take params from")
    p.add_argument("--storage", default="", help="Optuna storage URL of that study")
    p.add_argument("--max_classes", type=non_negative_int, default=0)
    p.add_argument("--max_per_class", type=non_negative_int, default=0)
    p.add_argument("--crop_to_bbox", type=str2bool, default=True)
    p.add_argument("--skip_bad_images", type=str2bool, default=False)
    p.add_argument(
        "--devices",
        default="auto",
        choices=("auto", "default", "mirrored"),
        help="tf.distribute: auto mirrors across several local GPUs",
    )
    return p


def main() -> None:
    a = build_parser().parse_args()  # Parse before the heavy imports: errors come fast.
    from cars_ml.data import DataConfig
    from cars_ml.hparams import HParams
    from cars_ml.train_run import TrainConfig, run_train

    hparams = HParams(
        epochs=a.epochs,
        fine_tune_epochs=a.fine_tune_epochs,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        fine_tune_learning_rate=a.fine_tune_learning_rate,
        dropout=a.dropout,
        head_units=a.head_units,
        label_smoothing=a.label_smoothing,
        unfreeze_fraction=a.unfreeze_fraction,
        augment_strength=a.augment_strength,
        weight_decay=a.weight_decay,
        patience=a.patience,
    )
    data = DataConfig(
        data=a.data,
        seed=a.seed,
        crop_to_bbox=a.crop_to_bbox,
        skip_bad_images=a.skip_bad_images,
        max_classes=a.max_classes,
        max_per_class=a.max_per_class,
    )
    run_train(
        TrainConfig(
            model=a.model,
            data=data,
            weights=a.weights,
            image_size=a.image_size,
            hparams=hparams,
            seed=a.seed,
            register=a.register,
            model_name=a.model_name,
            export_tflite=a.export_tflite,
            params_from=a.params_from,
            storage=a.storage,
            devices=a.devices,
        )
    )


if __name__ == "__main__":
    run_main(main)
