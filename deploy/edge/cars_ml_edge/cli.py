"""``cars-ml-edge``: measure registered cars-ml models on this device and log the numbers.

Thin: parse and check the arguments, connect, then hand over to :mod:`cars_ml_edge.agent`.
Every expected failure ends in one line on stderr and an exit code, never a traceback:
2 bad arguments, 1 server unreachable / credentials refused / other error, 143 SIGTERM,
130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage block: the message says what to fix.
        self.exit(2, f"cars-ml-edge: error: {message} (see --help)\n")


def _device(value: str) -> str:
    if not DEVICE_NAME.match(value):
        raise argparse.ArgumentTypeError(
            f"device name {value!r} must match ^[a-z0-9][a-z0-9_-]{{0,39}}$ "
            "(lower-case letters, digits, '-' and '_', at most 40)"
        )
    return value


def _positive_list(what: str):
    def parse(value: str) -> list[int]:
        try:
            items = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            items = []
        if not items or any(item < 1 for item in items) or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(
                f"{what} must be distinct positive integers separated by commas, got {value!r}"
            )
        return items

    return parse


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cars-ml-edge", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="MLflow server, e.g. http://host:5000")
    p.add_argument("--device", required=True, type=_device, help="this device's name, e.g. pi5")
    p.add_argument(
        "--threads",
        type=_positive_list("--threads"),
        default=[1],
        help="thread counts to measure, e.g. 1,4 (the first is the headline)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="measure what is pending, exit (default)")
    mode.add_argument("--watch", action="store_true", help="keep polling for new versions")
    p.add_argument("--interval", type=_positive, default=60, help="--watch poll seconds (60)")
    p.add_argument("--images", type=Path, help="folder of photos for int8-vs-float agreement")
    p.add_argument(
        "--versions",
        type=_positive_list("--versions"),
        help="measure exactly these versions, e.g. 3,5 (again if measured)",
    )
    p.add_argument("--model-name", default="stanford-cars-classifier")
    p.add_argument("--runs", type=_positive, default=50, help="timed runs per measurement (50)")
    p.add_argument("--warmup", type=_positive, default=5, help="untimed runs first (5)")
    p.add_argument(
        "--max-file-mb", type=_positive, default=200, help="largest model file loaded (200)"
    )
    p.add_argument(
        "--max-memory-mb",
        type=_positive,
        default=4096,
        help="address space of the process measuring one version (4096)",
    )
    p.add_argument(
        "--timeout-s", type=_positive, default=900, help="time to measure one version (900)"
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the device profile again (alone: then exit)",
    )
    return p


def masked(uri: str) -> str:
    """``uri`` with the password of a ``user:password@`` part replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def scrubbed(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked: MLflow's
    error messages repeat the URL they called."""
    return re.sub(r"(://[^/\s:@]+):[^@\s/]+@", r"\1:***@", text)


def _problem(exc: BaseException, uri: str) -> str | None:
    """One line for an MLflow or HTTP failure, or None when ``exc`` is something else."""
    text = str(exc)
    code = getattr(exc, "error_code", "")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or re.search(r"\b40[13]\b", text):
        return (
            f"{masked(uri)} refused the credentials: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to a user allowed to edit the runs and model versions"
        )
    if any(hint in text for hint in ("Max retries", "Connection", "timed out", "Failed to")):
        return (
            f"cannot reach the tracking server at {masked(uri)}: check the address and port, "
            "that `mlflow server` runs there and that this device can reach it"
        )
    return None


def plain_http_warning(uri: str, environ=os.environ) -> str | None:
    """A warning when credentials would cross the network unencrypted (http to another host)."""
    parts = urlsplit(uri)
    secret = (
        parts.password
        or environ.get("MLFLOW_TRACKING_PASSWORD")
        or environ.get("MLFLOW_TRACKING_TOKEN")
    )
    try:
        local = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        local = False
    if parts.scheme != "http" or not secret or local:
        return None
    return (
        f"WARNING: {masked(uri)} is plain http: the tracking credentials cross the network "
        "unencrypted, readable by anyone on the path. Put the server behind https (a reverse "
        "proxy with TLS) and use https:// here."
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        parser().error(f"--images {args.images}: not a folder")
    warning = plain_http_warning(args.tracking_uri)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # Fail within seconds when the server is away, instead of MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # The agent prints one progress line per version; per-file download bars only add noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    code = 1
    try:
        code = _run(args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing half-written", file=sys.stderr)
        code = 130
    except MemoryError:
        print("out of memory: close other programs or measure fewer threads", file=sys.stderr)
    except Exception as exc:
        from cars_ml_edge.agent import Interrupted

        if isinstance(exc, Interrupted):
            name = "SIGTERM" if exc.code == 143 else "Ctrl-C"
            print(f"stopped by {name}: nothing half-written", file=sys.stderr)
            return exc.code
        line = _problem(exc, args.tracking_uri)
        if line is None:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            line = f"error: {type(exc).__name__}: {first}"
        print(scrubbed(line), file=sys.stderr)
    return code


def _run(args) -> int:
    from mlflow import MlflowClient

    from cars_ml_edge import agent

    signals = agent.Signals()
    client = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    client.search_experiments(max_results=1)  # Reachable, and the credentials are accepted.
    options = agent.Options(
        model=args.model_name,
        device=args.device,
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        images=args.images,
        versions=args.versions,
        max_file_mb=args.max_file_mb,
        max_memory_mb=args.max_memory_mb,
        timeout_s=args.timeout_s,
    )
    agent.ensure_profile(client, options, force=args.calibrate)
    if args.calibrate and not (args.once or args.watch):
        return 0
    if not args.watch:
        try:
            agent.run_pass(client, options, signals)
        except LookupError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 1
        return 0
    print(f"watching {args.model_name} every {args.interval}s (Ctrl-C to stop)", flush=True)
    first, skipped = True, set()
    while True:
        try:
            agent.run_pass(client, options, signals, announce_empty=first, skipped=skipped)
            first = False
        except agent.Interrupted:
            raise
        except Exception as exc:
            # A benchmark worker outlives a server restart: say so and poll again.
            line = _problem(exc, args.tracking_uri)
            if line is None or "credentials" in line:
                raise
            print(f"{line}; retrying in {args.interval}s", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
