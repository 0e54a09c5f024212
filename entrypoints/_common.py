"""Helpers shared by the thin MLproject entry points: typed argument parsing, logging set-up.

MLproject hands every parameter over as a string; these converters turn them into typed
values with a clear error before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys

# The entry points are run as scripts (`python entrypoints/train.py`); make the project root
# importable when the package is not installed in editable mode.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX-512 VNNI or AMX,
# yet they train faster on AVX2-only CPUs too (docs/performance.md; `-P sections=cpu_kernels`
# measures it). It must be set before TensorFlow is imported; a user's own value wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str) -> bool:
    """Parse true/false/1/0/yes/no (any case)."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def comma_list(value: str) -> tuple[str, ...]:
    """``a,b , c`` -> ``("a", "b", "c")``; empty items are dropped."""
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


def integer(value: str) -> int:
    """An integer; ``5.0`` is accepted because MLproject ``float`` params may arrive that way."""
    number = float(value)
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(number)


def non_negative_int(value: str) -> int:
    number = integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def positive_int(value: str) -> int:
    number = integer(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


_OFF = {"none", "off", "inf", ""}


def budget(value: str) -> float | None:
    """A budget >= 0, or none/off to switch the budget off."""
    if str(value).strip().lower() in _OFF:
        return None
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or none), got {value}")
    return number


def device_name(value: str) -> str | None:
    """An edge agent's device name, or empty for none."""
    from cars_ml.promotion.policy import DEVICE_NAME

    text = str(value).strip()
    if not text:
        return None
    if not DEVICE_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device name: lower case letters, digits, '-' and '_' (at most "
            "40), as given to cars-ml-edge --device"
        )
    return text


_CREDENTIAL_FIX = (
    "pass the URL without it and put the password in PGPASSWORD (or the driver's password file, "
    "such as ~/.pgpass; MLFLOW_TRACKING_PASSWORD for a tracking server), and rotate this "
    "password: it has been exposed"
)


class _Parser(argparse.ArgumentParser):
    """Refuses any argument that carries a password (see :func:`refuse_credentials`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        refuse_credentials(parsed)
        return parsed, extra


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the formatting every entry point shares."""
    return _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def refuse_credentials(namespace: argparse.Namespace) -> None:
    """Raise ``ValueError`` when an argument holds a password; delete the run that logged it.

    ``mlflow run`` logs every parameter, as typed, on the run it creates before the entry point
    starts, so redacting it later is too late and the only safe answer is to refuse it. Under
    ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is deleted, so no visible run holds the
    password, and the command that purges it for good is printed.
    """
    from cars_ml.tracking.redaction import has_credentials, redact

    for name, value in vars(namespace).items():
        if isinstance(value, str) and has_credentials(value):
            _discard_mlflow_run()
            raise ValueError(
                f"{name}={redact(value)} holds a password, and parameters are stored in plain "
                f"text (`mlflow run` logs them before any code of ours runs): {_CREDENTIAL_FIX}."
            )


def _discard_mlflow_run() -> None:
    """Have the run ``mlflow run`` created deleted once it ends; print how to purge it.

    A detached ``cars_ml.tracking.discard`` process does the deletion: ``mlflow run`` writes the
    run's status after this process exits and fails on a run that is already deleted.
    """
    import subprocess

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from cars_ml.tracking.redaction import redact

    uri = redact(os.environ.get("MLFLOW_TRACKING_URI", "") or "./mlruns")
    if uri.startswith(("http://", "https://")):
        what = (
            "deleted as soon as `mlflow run` marks it failed. A tracking server cannot purge "
            "over HTTP: purge it for good on the server's host with `mlflow gc "
            f"--backend-store-uri <its database URL> --run-ids {run_id}` (with "
            f"MLFLOW_TRACKING_URI={uri} set, so artifacts go too)"
        )
    else:
        what = (
            "deleted and purged from the store for good as soon as `mlflow run` marks it "
            f"failed (if that fails, `mlflow gc --backend-store-uri {uri} --run-ids {run_id}`)"
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own session, so Ctrl-C or a SIGTERM to `mlflow run` does not stop the deletion. The
    # tracking URI travels in the environment, never on a command line that `ps` shows.
    subprocess.Popen(
        [sys.executable, "-m", "cars_ml.tracking.discard", run_id],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(
        f"note: MLflow run {run_id} holds the password in its parameters (`mlflow run` logged "
        f"them); it is {what}.",
        file=sys.stderr,
    )


def setup_logging() -> None:
    """Configure logging once, in the process that runs an entry point (never at import)."""
    logging.basicConfig(
        level=os.environ.get("CARS_ML_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (``kill``, Kubernetes)."""


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM while the first is being handled kills the process outright (the default
    # action), so a stuck clean-up can still be stopped without SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def install_sigterm_handler() -> None:
    """Turn SIGTERM into ``KeyboardInterrupt`` so runs end KILLED instead of staying RUNNING.

    Python's default action for SIGTERM ends the process at once: no ``finally`` block runs,
    so the MLflow run would stay RUNNING forever and an Optuna trial would wait for its
    heartbeat to go stale. Raising ``KeyboardInterrupt`` lets ``tracking.start_run`` end the run
    KILLED and Optuna mark the trial FAIL, exactly as Ctrl-C does.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


def run_main(main) -> None:
    """Run ``main()``; user errors (ValueError, ...) become one clear line and exit code 2.

    SIGTERM and Ctrl-C end the active MLflow run KILLED and exit with 143 and 130 (the shell's
    128 + signal number) after one line on stderr, not a traceback.
    """
    setup_logging()
    install_sigterm_handler()
    try:
        main()
    except (ValueError, ConnectionError, FileNotFoundError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(
            "error: terminated by SIGTERM; an active MLflow run was ended KILLED.", file=sys.stderr
        )
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("error: interrupted; an active MLflow run was ended KILLED.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def image_size(value: str) -> int:
    """``auto`` (native size, or a small one for synthetic data), 0 (native) or pixels."""
    from cars_ml import AUTO_SIZE

    return AUTO_SIZE if value.strip().lower() == "auto" else non_negative_int(value)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of one training run, shared by ``train`` and ``distill``."""
    from cars_ml import AUTO_SIZE

    p.add_argument(
        "--data", default="synthetic", help="synthetic, a Stanford Cars root or image folder"
    )
    p.add_argument("--weights", default="auto", help="auto, imagenet, none or a weights file")
    p.add_argument("--image_size", type=image_size, default=AUTO_SIZE, help="auto, 0=native or px")
    p.add_argument("--epochs", type=positive_int, default=2, help="phase-1 (head) epochs")
    p.add_argument("--fine_tune_epochs", type=non_negative_int, default=12)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--learning_rate", type=positive_float, default=1e-3)
    p.add_argument("--fine_tune_learning_rate", type=positive_float, default=3e-4)
    p.add_argument("--dropout", type=fraction, default=0.3)
    p.add_argument("--head_units", type=non_negative_int, default=0, help="0 = no hidden layer")
    p.add_argument("--label_smoothing", type=fraction, default=0.1)
    p.add_argument("--unfreeze_fraction", type=fraction, default=0.6)
    p.add_argument("--augment_strength", type=fraction, default=1.0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--patience", type=positive_int, default=3)
    p.add_argument(
        "--train_scale",
        type=fraction,
        default=0.86,
        help="fine-tuning trains at this share of image_size and serves at image_size (1 = off)",
    )
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
    p.add_argument(
        "--budget_gmacs",
        type=non_negative_float,
        default=0.0,
        help="training compute per image in GMACs: epochs by cost (0 = off: epochs as given)",
    )
    p.add_argument(
        "--slices",
        default="",
        help="CSV mapping class to group for slice metrics (empty: make/body type from names)",
    )


def train_config(a: argparse.Namespace, model: str, **extra):
    """The ``TrainConfig`` of parsed ``add_train_arguments`` values (imports the library)."""
    from cars_ml.data import DataConfig
    from cars_ml.training.hparams import HParams
    from cars_ml.training.run import TrainConfig

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
        train_scale=a.train_scale,
    )
    data = DataConfig(
        data=a.data,
        seed=a.seed,
        crop_to_bbox=a.crop_to_bbox,
        skip_bad_images=a.skip_bad_images,
        max_classes=a.max_classes,
        max_per_class=a.max_per_class,
    )
    return TrainConfig(
        model=model,
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
        budget_gmacs=a.budget_gmacs,
        slices=a.slices,
        **extra,
    )
