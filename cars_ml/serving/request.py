"""Read a scoring request's JSON body into the list of image values, within the request limits.

MLflow's scoring server turns ``{"inputs": ...}`` and ``{"instances": ...}`` bodies into numpy
string arrays before any model code runs, and numpy pads every entry to the longest one: a
legitimate request of one 10 MB image and 63 small ones becomes a 3.6 GB array. The server guard
(``scoring_guard.py``) therefore reads JSON bodies with this module instead. It accepts the four
JSON shapes of MLflow's scoring protocol for the one ``image`` column, counts the values before
building anything from them, and hands the model a plain list of Python strings, so a request
costs about its own size in memory.

Pure ``json`` (no MLflow, no numpy) so it can be tested on its own. Every problem raises
:class:`~cars_ml.serving.decode.RequestError` with a short message that names the fix; the
request is never echoed back.
"""

from __future__ import annotations

import csv
import io
import json

from cars_ml.serving.decode import Limits, RequestError

COLUMN = "image"
FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
# The body's keys that are not input data: MLflow's inference parameters (this model has none).
PARAMS_KEY = "params"
EXAMPLE = (
    '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}} or '
    '{"inputs": {"image": ["<base64>"]}}'
)


# JSON items a request may hold per image it may carry: a value in ``dataframe_records`` costs a
# brace and two commas at most, and a data URL one comma more. A body within the byte limit can
# otherwise hold millions of tiny lists or strings, many times its size as Python objects.
ITEMS_PER_IMAGE = 8
ITEMS_BASE = 64


def media_type(header: str) -> tuple[str, dict[str, list[str]]]:
    """The lower-cased media type of a ``Content-Type`` header and its parameters (name -> every
    value given, lower-cased, quotes removed), whatever their order, case or spacing."""
    kind, _, rest = header.partition(";")
    params: dict[str, list[str]] = {}
    for part in rest.split(";"):
        name, _, value = part.partition("=")
        if name.strip():
            params.setdefault(name.strip().lower(), []).append(value.strip().strip('"').lower())
    return kind.strip().lower(), params


def parse_body(body: bytes, limits: Limits) -> list[str]:
    """The base64 values of a JSON request body (``bytes``), in order."""
    _check_structure(body, limits)
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestError(
            f"the request JSON is nested too deeply to parse; send {EXAMPLE}."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # The position tells a client what is wrong without echoing the body.
        where = f" at byte {exc.start}" if isinstance(exc, UnicodeDecodeError) else f" ({exc})"
        raise RequestError(f"the request body is not valid JSON{where}; send {EXAMPLE}.") from None
    except ValueError:
        # Python refuses integers of more than a few thousand digits (int_max_str_digits).
        raise RequestError(
            f"the request JSON holds a number too long to read; send {EXAMPLE}."
        ) from None
    if isinstance(document, list):
        raise RequestError(
            f"Received a list; the input must be a JSON dictionary with one of {FORMATS}: {EXAMPLE}."
        )
    if not isinstance(document, dict):
        raise RequestError(
            f"the input must be a JSON dictionary with one of {FORMATS}, got "
            f"{type(document).__name__}: {EXAMPLE}."
        )
    keys = [key for key in document if key in FORMATS]
    unknown = [str(key)[:40] for key in document if key not in FORMATS and key != PARAMS_KEY]
    if len(keys) != 1 or unknown:
        raise RequestError(
            f"the input must be a JSON dictionary with exactly one of the input fields {FORMATS}"
            f" (got {sorted(str(k)[:40] for k in document)[:8]}): {EXAMPLE}."
        )
    values = _values(keys[0], document[keys[0]])
    _check_count(len(values), limits)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise RequestError(
                f"expected a base64-encoded image string, got {type(value).__name__}; "
                "base64-encode the JPEG or PNG file bytes.",
                index=index,
            )
    return values


def parse_csv(body: bytes, limits: Limits) -> list[str]:
    """The base64 values of a ``text/csv`` body: a header ``image``, then one value a row."""
    rows = max(body.count(b"\n"), body.count(b"\r"))
    if rows > limits.max_images_per_request + 2:  # the header and a last line break
        _check_count(rows - 1, limits)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the CSV body is not UTF-8 (byte {exc.start}); send UTF-8.") from None
    # The module's field limit (128 KiB) is below one legitimate image; the request limit bounds it.
    csv.field_size_limit(max(csv.field_size_limit(), limits.max_request_bytes))
    try:
        table = [row for row in csv.reader(io.StringIO(text)) if row]
    except csv.Error as exc:
        raise RequestError(
            f"the CSV body cannot be read ({exc}); send a header 'image' and one "
            "base64 value a row, or JSON such as " + EXAMPLE + "."
        ) from None
    if not table:
        raise RequestError(f"empty request: no CSV header and no images; send {EXAMPLE}.")
    _check_columns(table[0])
    _check_count(len(table) - 1, limits)
    for index, row in enumerate(table[1:]):
        if len(row) != 1:
            raise RequestError(f"expected one value in the row, got {len(row)}.", index=index)
    return [row[0] for row in table[1:]]


def _check_structure(body: bytes, limits: Limits) -> None:
    """Refuse, before parsing, a body holding more JSON values than its images could need.

    Every value after the first in a list or object follows a comma, and every list or object
    opens with a bracket, so these three bytes bound what ``json.loads`` would build (base64
    has none of them). Counted at C speed.
    """
    items = body.count(b",") + body.count(b"[") + body.count(b"{")
    allowed = ITEMS_PER_IMAGE * limits.max_images_per_request + ITEMS_BASE
    if items > allowed:
        raise RequestError(
            f"too many JSON items in one request: {items} > {allowed} for "
            f"max_images_per_request={limits.max_images_per_request}; split it into several "
            f"requests of {EXAMPLE}."
        )


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise RequestError(f"empty request: no images; send at least one: {EXAMPLE}.")
    if count > limits.max_images_per_request:
        raise RequestError(
            f"too many images in one request: {count} > max_images_per_request="
            f"{limits.max_images_per_request}; split it into several requests."
        )


def _check_columns(columns: object) -> None:
    if not isinstance(columns, list) or COLUMN not in columns:
        raise RequestError(
            f"missing column 'image' (got columns {str(columns)[:200]}); send {EXAMPLE}."
        )
    extra = [str(c)[:40] for c in columns if c != COLUMN]
    if extra:
        raise RequestError(
            f"unexpected column(s) {extra[:8]}; the model takes exactly one column 'image' "
            "holding base64-encoded JPEG or PNG bytes."
        )


def _record_value(record: object) -> object:
    if isinstance(record, dict):
        _check_columns(list(record))
        return record[COLUMN]
    return record


def _values(kind: str, payload: object) -> list:
    if kind == "dataframe_split":
        if not isinstance(payload, dict) or "data" not in payload:
            raise RequestError(f"dataframe_split must have 'data' field: {EXAMPLE}.")
        _check_columns(payload.get("columns", [COLUMN]))
        rows = payload["data"]
        if not isinstance(rows, list):
            raise RequestError(f"dataframe_split 'data' must be a list of rows: {EXAMPLE}.")
        return [row[0] if isinstance(row, list) and len(row) == 1 else row for row in rows]
    if kind == "dataframe_records":
        if not isinstance(payload, list):
            raise RequestError(f"dataframe_records must be a list of records: {EXAMPLE}.")
        return [_record_value(record) for record in payload]
    # ``inputs`` and ``instances``: columnar ``{"image": [...]}``, or a list of values or records.
    if isinstance(payload, dict):
        _check_columns(list(payload))
        payload = payload[COLUMN]
    if isinstance(payload, str):
        return [payload]
    if isinstance(payload, list):
        return [_record_value(value) for value in payload]
    raise RequestError(
        f"{kind} must hold a list of base64 strings, got {type(payload).__name__}: {EXAMPLE}."
    )
