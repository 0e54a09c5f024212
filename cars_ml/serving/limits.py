"""The serving limits: what one request and the whole server may cost, and their overrides.

Each model version carries its ``Limits`` in its serving config; an operator overrides any of
them at serve time with ``CARS_ML_LIMIT_<NAME>`` (:func:`limits_from_env`). Plain values only:
the decoder (``decode.py``) and the ASGI gate (``gate.py``) enforce them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may hold; logged in ``serving_config.json``.

    - ``max_image_bytes`` (default 10 MiB): decoded size of one image file. Checked on the base64
      length first, so an oversized value is refused before it is decoded.
    - ``max_pixels`` (default 40 megapixels): width x height read from the image header before
      any pixel is decoded; stops decompression bombs (a tiny PNG that inflates to gigabytes).
    - ``max_images_per_request`` (default 64): images in one request; split bigger jobs.
    - ``max_request_pixels`` (default 100 megapixels): the pixels all of a request's images declare
      in their headers, summed before each is decoded; bounds a request's decoding work.
    - ``decode_time_s`` (default 10): a request whose decoding has taken longer stops before its
      next image (HTTP 400); one image's work is bounded by the pixel and format limits.
    - ``max_request_bytes`` (default 24 MiB): the whole HTTP body, refused with 413 before it is
      read (from ``Content-Length``) or as soon as more arrives; fits one image at the limit.
    - ``max_concurrent_requests`` (default 4): requests the server reads and answers at once;
      the next ones wait for a slot (up to ``queue_timeout_s``, default 30 s, then 503).
    - ``body_timeout_s`` (default 30) and ``body_idle_timeout_s`` (default 10): a body must arrive
      within these in all and between two pieces (else 408), before it takes a slot.
    - ``max_buffered_mb`` (default 256): request bodies the server holds at once, being read,
      waiting or worked on (else 503).
    - ``decode_memory_mb`` (default 512): memory the server's image decodes may hold at once,
      estimated from each image's header (see :func:`decode_cost`); a decode that does not fit
      waits for others to finish, and one larger than the whole budget runs alone.

    Together these bound the server's memory: see docs/serving.md for the budget they give.
    """

    max_image_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images_per_request: int = 64
    max_request_bytes: int = 24 * 1024 * 1024
    max_concurrent_requests: int = 4
    decode_memory_mb: int = 512
    queue_timeout_s: float = 30.0
    max_request_pixels: int = 100_000_000
    decode_time_s: float = 10.0
    body_timeout_s: float = 30.0
    body_idle_timeout_s: float = 10.0
    max_buffered_mb: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {value}.")
        if self.max_buffered_mb * 2**20 < self.max_request_bytes:
            raise ValueError(
                f"Limits.max_buffered_mb={self.max_buffered_mb} must hold one body of "
                f"max_request_bytes={self.max_request_bytes}."
            )


# An operator overrides one of a served model's limits with CARS_ML_LIMIT_<FIELD> (for example
# CARS_ML_LIMIT_MAX_CONCURRENT_REQUESTS=8) in the server's environment.
LIMITS_ENV_PREFIX = "CARS_ML_LIMIT_"


def limits_from_env(limits: Limits, environ: Mapping[str, str] | None = None) -> Limits:
    """``limits`` with every field the environment sets (``CARS_ML_LIMIT_<FIELD>``) replaced;
    a misspelt name or a bad value stops the server with the variable named."""
    environ = os.environ if environ is None else environ
    known = {LIMITS_ENV_PREFIX + f.name.upper(): f.name for f in fields(Limits)}
    changes: dict[str, float | int] = {}
    for variable, raw in environ.items():
        if not variable.startswith(LIMITS_ENV_PREFIX):
            continue
        if variable not in known:
            raise ValueError(
                f"{variable} is not a serving limit; the limits are {', '.join(sorted(known))}."
            )
        name = known[variable]
        kind = type(getattr(limits, name))
        try:
            changes[name] = kind(raw.strip())
        except ValueError:
            raise ValueError(
                f"{variable}={raw[:40]!r} is not {'a number' if kind is float else 'an integer'}."
            ) from None
    return replace(limits, **changes) if changes else limits
