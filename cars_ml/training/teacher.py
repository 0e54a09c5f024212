"""The teacher of a distillation run: a registered version, resolved, loaded and checked once per
process, with its outputs on the unaugmented training, validation and test images cached on disk.

The train step (a student's final training) and the tune step (a distillation study) both start
here; the training itself is ``cars_ml.training.distill``.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cars_ml import tracking
from cars_ml.data.types import DatasetSplits, default_cache_dir

log = logging.getLogger(__name__)


@dataclass
class TeacherInfo:
    """A loaded teacher: its registry entry and its outputs on the three splits."""

    version: tracking.RegisteredModel
    outputs: dict[str, np.ndarray]  # "train", "val" and "test" probabilities, in split order

    @property
    def backbone(self) -> str:
        return self.version.tags.get("backbone", "unknown")

    def lineage_tags(self) -> dict[str, str]:
        """Tags of a student's run and registered version: where its knowledge came from."""
        return {"distilled_from": self.version.uri, "teacher_backbone": self.backbone}


def load_teacher(version: tracking.RegisteredModel, splits: DatasetSplits) -> TeacherInfo:
    """Download and load ``version``'s model, check its classes against ``splits``, and get its
    outputs on the unaugmented training, validation and test images.

    Those outputs are computed once per teacher version, images and image size and cached on
    disk (``CARS_ML_CACHE``): every later student of the same teacher (another trial, seed or
    backbone) reads them instead of running the teacher again.
    """
    from cars_ml.data.pipeline import make_dataset
    from cars_ml.training.distill import (
        cached_teacher_outputs,
        check_class_names,
        load_teacher_model,
        teacher_outputs_key,
    )
    from cars_ml.training.fit import predict_probabilities

    with tempfile.TemporaryDirectory() as tmp:
        model, names = load_teacher_model(tracking.download_model(version.uri, tmp))
    check_class_names(names, list(splits.class_names))
    size = int(model.input_shape[1])
    # Keyed on the records themselves: a study's trials train on a share of the training split
    # (another dataset fingerprint) of the same images.
    images = hashlib.sha256(repr((splits.train, splits.val, splits.test)).encode()).hexdigest()
    key = teacher_outputs_key(f"{version.uri}:{version.run_id}", images, size)

    def compute() -> dict[str, np.ndarray]:
        return {
            split: predict_probabilities(
                model, make_dataset(getattr(splits, split), size, 32, training=False)
            )
            for split in ("train", "val", "test")
        }

    outputs = cached_teacher_outputs(Path(default_cache_dir()) / "teachers", key, compute)
    log.info("Teacher %s (%s, %d px)", version.uri, version.tags.get("backbone", "?"), size)
    return TeacherInfo(version, outputs)
