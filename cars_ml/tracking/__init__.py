"""The only package that starts MLflow runs and logs to them (secrets scrubbed).

``runs`` starts runs and logs; ``models`` logs, registers and loads the serving model;
``redaction`` scrubs secrets; ``check`` fails fast on an unusable store; ``discard`` deletes a
refused run. Callers write ``from cars_ml import tracking`` and ``tracking.start_run(...)``: the
names of ``runs``, ``models`` and ``redaction`` are re-exported here, and ``MlflowException``
for callers that catch it without importing MLflow themselves.
"""

from mlflow.exceptions import MlflowException

from cars_ml.tracking.devices import device_profiles
from cars_ml.tracking.models import (
    RegisteredModel,
    check_model_uri,
    check_serving_code,
    download_model,
    load_pyfunc,
    log_pyfunc_model,
    register_in_scratch_store,
    register_model,
    resolve_model_version,
)
from cars_ml.tracking.redaction import has_credentials, redact
from cars_ml.tracking.runs import (
    active_run_id,
    base_tags,
    check_tracking_server,
    close_stale_runs,
    filter_equals,
    find_finished_run,
    log_artifact,
    log_artifacts,
    log_dataset,
    log_dict,
    log_figure,
    log_metrics,
    log_params,
    log_table,
    running_parent_runs,
    set_tags,
    start_run,
    tracking_uri,
    ui_base,
    ui_links,
    use_experiment,
)

__all__ = [
    "MlflowException",
    "RegisteredModel",
    "active_run_id",
    "base_tags",
    "check_model_uri",
    "check_serving_code",
    "check_tracking_server",
    "close_stale_runs",
    "device_profiles",
    "download_model",
    "filter_equals",
    "find_finished_run",
    "has_credentials",
    "load_pyfunc",
    "log_artifact",
    "log_artifacts",
    "log_pyfunc_model",
    "log_dataset",
    "log_dict",
    "log_figure",
    "log_metrics",
    "log_params",
    "log_table",
    "redact",
    "register_in_scratch_store",
    "register_model",
    "resolve_model_version",
    "running_parent_runs",
    "set_tags",
    "start_run",
    "tracking_uri",
    "ui_base",
    "ui_links",
    "use_experiment",
]
