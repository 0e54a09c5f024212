"""Turn two request shapes that MLflow's scoring server answers with HTTP 500 into 4xx.

``mlflow models serve`` parses the request in ``mlflow/pyfunc/scoring_server/__init__.py``
before any model code runs, and answers two hostile inputs with an unhandled exception (500):

- JSON nested more deeply than Python's recursion limit (``[[[[...]]]]``, ~2 KB suffices):
  ``_decode_json_input`` catches ``JSONDecodeError`` but not the ``RecursionError`` that
  ``json.loads`` raises;
- a request without a ``Content-Type`` header: ``invocations`` calls ``content_type.split``
  on ``None``.

The model is loaded inside the server process before the first request, so
``CarsClassifier.load_context`` calls :func:`harden_scoring_server`, which wraps the module's
``invocations`` function (looked up by name on every request) to answer those two with a
400/415. It only acts where the scoring server module is already imported (the serving process)
and leaves a newer MLflow that lacks the function alone. Verified against MLflow 3.17.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

_MARK = "_cars_ml_guarded"
NESTING_MESSAGE = (
    "Invalid input. The request JSON is nested too deeply to parse; send "
    '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}} or '
    '{"inputs": {"image": ["<base64>"]}}.'
)
CONTENT_TYPE_MESSAGE = (
    "Missing Content-Type header; send the request with 'Content-Type: application/json'."
)


def harden_scoring_server() -> bool:
    """Wrap the scoring server's ``invocations``; returns whether the guard is in place."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    original = getattr(server, "invocations", None) if server else None
    response_type = getattr(server, "InvocationsResponse", None) if server else None
    if original is None or response_type is None:
        return False
    if getattr(original, _MARK, False):
        return True
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    def invocations(data, content_type, model, input_schema):
        if not content_type:
            return response_type(response=CONTENT_TYPE_MESSAGE, status=415, mimetype="text/plain")
        try:
            return original(data, content_type, model, input_schema)
        except RecursionError:
            # The server's error handler turns an MlflowException into its HTTP status (400).
            raise MlflowException(NESTING_MESSAGE, error_code=BAD_REQUEST) from None

    setattr(invocations, _MARK, True)
    server.invocations = invocations
    log.info("Scoring server hardened: deep JSON and a missing Content-Type get 4xx, not 500.")
    return True
