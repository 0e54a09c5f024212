"""Measurement primitives: latency percentiles, timing side by side, multiply-adds, compute
peaks and device estimates, process control. The bottom layer: it imports nothing of the
product, and every stage may use it; the ``benchmark`` step that compares the product against
its baselines (``cars_ml.perf``) sits on top of the stages instead.
"""
