"""Find and hide credentials in text: URL passwords, password query parameters, secret env values.

Plain ``re`` and ``os`` only, so the entry points can refuse a credential while parsing their
arguments, before MLflow or TensorFlow is imported. :mod:`cars_ml.tracking` re-exports
:func:`redact` and applies it to everything it logs.
"""

from __future__ import annotations

import os
import re
from typing import Any

# ``scheme://user:password@host``. The user name may be empty (``postgresql://:pw@host``). An
# unescaped ``@`` inside the password belongs to it as long as another ``@`` follows before the
# path starts (``u:p@ss@host`` hides ``p@ss``); an ``@`` later in the path or query does not.
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*)"
    r":(?P<pw>(?:[^\s@]|@(?=[^\s@/]*@))+)@"
)
# ``?password=pw``, ``&sslpassword=pw``, ``?X-Amz-Security-Token=...`` and the libpq keyword
# form ``host=h password=pw``: the value runs to the next separator.
_QUERY_SECRET = re.compile(
    r"(?P<key>(?:(?<=[?&;\s])|^)[A-Za-z0-9_.-]*"
    r"(?:password|passwd|pwd|secret|token|signature|api[_-]?key)[A-Za-z0-9_.-]*=)"
    r"(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "PGPASSWORD",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    # The per-client credentials of deploy/ (.env.example): database roles, MinIO, serving.
    "MLFLOW_DB_PASSWORD",
    "OPTUNA_DB_PASSWORD",
    "MINIO_MLFLOW_PASSWORD",
    "MLFLOW_SERVE_PASSWORD",
)


def has_credentials(text: Any) -> bool:
    """Whether ``text`` holds a URL password or a password-like query parameter."""
    value = str(text)
    return bool(_URL_PASSWORD.search(value) or _QUERY_SECRET.search(value))


def redact(value: Any) -> str:
    """Stringify ``value`` with URL passwords and known secret values replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<scheme>:***@", str(value))
    text = _QUERY_SECRET.sub(r"\g<key>***", text)
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        # Very short values would blank out ordinary words; such a secret is weak anyway.
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
