"""cars-ml: fine-grained car recognition (Stanford Cars) with MLflow tracking, tuning and serving.

Importing the package has no side effects: no tracking URI is set, no folder is created,
no logging is configured. Entry points in ``entrypoints/`` do that.
"""

__version__ = "0.1.0"

REGISTERED_MODEL_NAME = "stanford-cars-classifier"
CHAMPION_ALIAS = "champion"

# The serving code a model version carries (its copy of the request guard, limits and decoder),
# recorded on each version as the tag ``serving_code_version``. A release whose fixes must reach
# every served model raises both numbers; ``serve``, ``promote`` and ``rollback`` refuse a version
# older than the minimum unless ``allow_old_serving_code`` is set, and that override is logged.
SERVING_CODE_VERSION = 2
MIN_SERVING_CODE_VERSION = 2
SERVING_CODE_TAG = "serving_code_version"
OLD_SERVING_CODE_FIX = (
    "train it again with this release (`mlflow run . -e train -P model=<backbone>`), which "
    "registers a new version carrying the current serving code, or pass "
    "allow_old_serving_code=true to accept it anyway (logged)"
)


def serving_code_version(tags) -> int:
    """The serving code version recorded in a model version's ``tags`` (0 when absent: the
    version predates the record)."""
    try:
        value = float(str((tags or {}).get(SERVING_CODE_TAG, "0")).strip() or 0)
    except ValueError:
        return 0
    return int(value) if value == value else 0  # NaN: a table row without the record


# Plain constants the entry points need while parsing arguments, kept here so that `--help`
# and argument errors do not wait for TensorFlow to import.
AUTO_SIZE = -1
ORIGINAL_BACKBONES = (
    "inception_resnet",
    "inception",
    "mobilenet",
    "resnet",
    "vgg16",
    "vgg19",
    "xception",
)
# The pipeline's budgets (cars_ml.pipeline.plan.PRESETS), auto choosing by data and hardware.
PRESET_CHOICES = ("auto", "demo", "cpu", "full")
