"""Device profiles that the edge agent stores in MLflow (``cars-ml-edge --calibrate``).

One run per device in the experiment ``cars-ml-devices``, tagged ``device=<name>``, with the
device's peak multiply-add rates on the agent's probes (``peak_<P>_gmacs_t<T>``); see
deploy/edge/README.md for the whole contract. Read-only here: the agent writes them.
"""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

DEVICES_EXPERIMENT = "cars-ml-devices"


def device_profiles() -> dict[str, dict[str, float]]:
    """Device name -> its profile run's metrics; empty when no device was calibrated."""
    client = MlflowClient()
    try:
        experiment = client.get_experiment_by_name(DEVICES_EXPERIMENT)
        if experiment is None:
            return {}
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
    except MlflowException as exc:
        # Estimates are a convenience: a store that cannot answer must not fail a training.
        log.warning("device profiles unreadable (%s); no latency estimates", exc)
        return {}
    profiles = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        device = run.data.tags.get("device") or run.info.run_name
        if device:
            profiles[device] = dict(run.data.metrics)
    return profiles
