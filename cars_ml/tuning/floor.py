"""The frozen-feature floor: what a logistic regression on a pretrained backbone's frozen pooled
features reaches on a dataset's split, the baseline every fine-tuned model must clear (no MLflow).

The train and validation features are the tuning step's cached ones (computed there if absent);
only the test images go through the backbone here. The regularisation strength is the one of a
few that scores best on validation, so the floor is a fair one.
"""

from __future__ import annotations

import numpy as np

from cars_ml.modeling import backbones

FLOOR_BACKBONE = "efficientnet_lite0"
C_VALUES = (0.05, 0.2, 1.0)


def frozen_feature_floor(splits, name: str = FLOOR_BACKBONE) -> dict[str, float]:
    """``val_f1_macro``, ``test_f1_macro`` and the chosen ``C`` of the logistic regression on
    ``name``'s frozen ImageNet features at its native size (raises ``ValueError`` without the
    ImageNet weights)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cars_ml.layers.preprocess import ImagePreprocess
    from cars_ml.training.evaluate import macro_f1
    from cars_ml.tuning.features import cached_features, extract

    spec = backbones.get_backbone(name)
    size = spec.native_size
    backbone, used = backbones.build_backbone(spec, size, "imagenet")
    preprocess = ImagePreprocess(spec.preprocess)
    arrays, _ = cached_features(
        backbone, preprocess, splits, name=name, image_size=size, weights_used=used
    )
    test_x = extract(backbone, splits.test, size, preprocess)
    test_y = np.array([r.label for r in splits.test], dtype=np.int32)
    scaler = StandardScaler().fit(arrays["train_x"])
    best = None
    for c in C_VALUES:
        model = LogisticRegression(C=c, max_iter=1000)
        model.fit(scaler.transform(arrays["train_x"]), arrays["train_y"])
        probs = _full(model, scaler.transform(arrays["val_x"]), splits.num_classes)
        score = macro_f1(arrays["val_y"], probs)
        if best is None or score > best[0]:
            best = (score, c, model)
    val_f1, c, model = best
    test_f1 = macro_f1(test_y, _full(model, scaler.transform(test_x), splits.num_classes))
    return {"val_f1_macro": val_f1, "test_f1_macro": test_f1, "C": c}


def _full(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over every class (columns of classes absent from training stay 0)."""
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs
