"""Which ``tf.distribute`` strategy a training run uses: every local accelerator by default.

``auto`` mirrors the model across all local GPUs when there are several and uses TensorFlow's
default (single-device) strategy otherwise. ``CARS_ML_CPU_DEVICES=N`` splits the CPU into N
logical devices and mirrors across them, so the mirrored path runs (and is tested) on machines
without GPUs. Several machines are not offered for one training run: MultiWorkerMirroredStrategy
fails inside Keras 3.15.1's ``Model.fit`` (see ``MULTI_WORKER_BLOCKED``); across machines the
project scales tuning (many workers, one Optuna study) instead.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

CPU_DEVICES_ENV = "CARS_ML_CPU_DEVICES"
MODES = ("auto", "default", "mirrored")
# Measured with two local workers (TF_CONFIG, CPU): Keras 3.15.1's fit() first reduces a batch of
# PerReplica values, which CollectiveAllReduceStrategy rejects ("Attempt to convert a value
# (PerReplica...)"); building the model outside that step then fails in the train step's loss
# reduction ("Invalid reduction dimension 0 for input with 0 dimensions").
MULTI_WORKER_BLOCKED = (
    "devices=multi_worker (MultiWorkerMirroredStrategy) does not train with the pinned Keras "
    "3.15.1: Model.fit fails reducing the first distributed batch. Train on one machine with "
    "devices=mirrored (all local GPUs) and scale out across machines with tune workers."
)


def requested_cpu_devices() -> int:
    """N from ``CARS_ML_CPU_DEVICES`` (0 when unset)."""
    raw = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{CPU_DEVICES_ENV}={raw!r} is not a whole number >= 1; set it to the number of "
            "logical CPU devices to mirror across (e.g. 2), or unset it."
        )
    return int(raw)


def split_cpu(n: int) -> int:
    """Split the first CPU into ``n`` logical devices; returns how many CPU devices exist.

    TensorFlow accepts this only before its runtime starts. When an earlier step in the same
    process (e.g. tuning in the pipeline) already started it, the existing devices are kept.
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            log.warning(
                "TensorFlow already started with %d CPU device(s); %s=%d ignored",
                have,
                CPU_DEVICES_ENV,
                n,
            )
    return len(tf.config.list_logical_devices("CPU"))


def strategy(devices: str = "auto") -> tf.distribute.Strategy:
    """The strategy for ``devices``: auto, default or mirrored (all local devices).

    Call it before anything else touches TensorFlow, so a CPU split can still apply.
    """
    import tensorflow as tf

    if devices == "multi_worker":
        raise ValueError(MULTI_WORKER_BLOCKED)
    if devices not in MODES:
        raise ValueError(f"devices={devices!r} is not one of {', '.join(MODES)}.")
    if devices == "default":
        return tf.distribute.get_strategy()
    n_cpu = requested_cpu_devices()
    if n_cpu > 1:
        split_cpu(n_cpu)  # Before listing logical devices: listing starts the runtime.
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1 or (devices == "mirrored" and gpus):
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and (devices == "mirrored" or (n_cpu > 1 and len(cpus) > 1)):
        # NCCL all-reduce is GPU-only; on CPU devices reduce through one device.
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    return tf.distribute.get_strategy()


def describe(strat: tf.distribute.Strategy) -> dict[str, object]:
    """Params to log: the strategy's class name and how many replicas train in sync."""
    return {
        "distribution_strategy": type(strat).__name__.lstrip("_"),
        "num_replicas": int(strat.num_replicas_in_sync),
    }
