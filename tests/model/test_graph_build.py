"""Grappler for long training runs only: the process-wide switch follows the run's length."""

from __future__ import annotations

import tensorflow as tf

from cars_ml.modeling.graph_build import MAX_STEPS_WITHOUT_GRAPPLER, use_grappler_for


def _disabled() -> bool:
    return bool(tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer"))


def test_short_runs_go_without_grappler_and_long_runs_keep_it():
    try:
        assert use_grappler_for(MAX_STEPS_WITHOUT_GRAPPLER) is False
        assert _disabled()
        # A function first called without grappler still computes the same thing.
        assert float(tf.function(lambda x: x * 2.0 + 1.0)(tf.constant(3.0))) == 7.0
        assert use_grappler_for(MAX_STEPS_WITHOUT_GRAPPLER + 1) is True
        assert not _disabled()
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
