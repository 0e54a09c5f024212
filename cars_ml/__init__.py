"""cars-ml: fine-grained car recognition (Stanford Cars) with MLflow tracking, tuning and serving.

Importing the package has no side effects: no tracking URI is set, no folder is created,
no logging is configured. Entry points in ``entrypoints/`` do that.
"""

__version__ = "0.1.0"

REGISTERED_MODEL_NAME = "stanford-cars-classifier"
CHAMPION_ALIAS = "champion"

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
