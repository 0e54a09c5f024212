"""How much TensorFlow optimises a run's graphs: worth it for long runs, not for short ones.

Grappler, TensorFlow's graph optimiser, runs once per compiled function, when it is first
called, and for a backbone trained from scratch it is much of that first call. What it buys is
speed per step, mostly from the remapper's fused kernels, with no measurable change in batch-1
inference and byte-identical TFLite files (docs/performance.md, "Graph optimisation for short
runs"). So a run of a few dozen steps, a demo or a quick tuning trial, starts faster without
it, and a real training run keeps it.

The setting is process-wide and TensorFlow reads it at every call of a compiled function: a
function first called under one setting is optimised again when called under another. So it
is chosen once per training run, before the run's first compiled call, and left alone.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Below this many training steps in a run, grappler's start-up cost outweighs what it saves
# per step (the break-even of docs/performance.md, "Graph optimisation for short runs").
MAX_STEPS_WITHOUT_GRAPPLER = 90


def use_grappler_for(steps: int) -> bool:
    """Switch grappler on for a run of ``steps`` training steps, or off for a short one.

    Returns whether it is on. Runs of ``MAX_STEPS_WITHOUT_GRAPPLER`` steps or fewer go without.
    """
    on = steps > MAX_STEPS_WITHOUT_GRAPPLER
    if set_grappler(on):
        log.info("Grappler %s for a run of %d training steps", "on" if on else "off", steps)
    return on


def set_grappler(on: bool) -> bool:
    """Switch grappler on or off for this process; returns whether that changed anything."""
    import tensorflow as tf

    disabled = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    if disabled == (not on):  # Already as asked.
        return False
    # Changing it re-optimises every function already called once, so only when needed.
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not on})
    return True
