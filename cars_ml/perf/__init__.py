"""Side-by-side benchmarks of the product against its baselines (the ``benchmark`` entry point).

One module per comparison; each function takes a size or time budget and returns a dict of
plain metrics, so the whole set runs in seconds in tests and for minutes on a real machine.
Only ``run.py`` logs, and only through ``cars_ml.tracking``.
"""
