"""One pass of the agent: calibrate when needed, then measure each pending version and log it.

Measuring a version writes nothing until all its numbers exist; the write itself runs with
SIGTERM and Ctrl-C deferred (see :class:`Signals`), so an interruption leaves either nothing
or a complete measurement with its marker.

The model files come from the server, so they are untrusted here: each is loaded only when it
is within ``--max-file-mb`` and hashes to the SHA-256 its training run recorded, and it is
measured in a child process with ``--max-memory-mb`` of address space and ``--timeout-s`` of
time, so a file that crashes or hangs the runtime costs that version, not the agent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cars_ml_edge import calibrate, facts, measure, registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class Interrupted(Exception):
    """SIGTERM (exit 143) or Ctrl-C (exit 130) between two steps."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Signals:
    """Turns SIGTERM and SIGINT into :class:`Interrupted`, except inside ``deferred()``, where
    the signal waits until the block is done."""

    def __init__(self):
        self._deferring = False
        self._pending: int | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        code = 128 + signum
        if self._deferring:
            self._pending = code
        else:
            raise Interrupted(code)

    def deferred(self):
        signals = self

        class _Block:
            def __enter__(self):
                signals._deferring = True

            def __exit__(self, *exc):
                signals._deferring = False
                if signals._pending is not None and exc[0] is None:
                    raise Interrupted(signals._pending)

        return _Block()


@dataclass(frozen=True)
class Options:
    model: str
    device: str
    threads: list[int]
    runs: int
    warmup: int
    images: Path | None
    versions: list[int] | None
    max_file_mb: int = 200
    max_memory_mb: int = 4096
    timeout_s: int = 900


def load_images(folder: Path, size: tuple[int, int]) -> list[np.ndarray]:
    """Every decodable photo in ``folder``, RGB, resized to ``size`` (height, width)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        except (OSError, UnidentifiedImageError):
            print(f"  {path.name}: not a readable image; left out", flush=True)
            continue
        images.append(np.asarray(rgb, dtype=np.uint8))
    return images


def measure_files(files: dict[str, Path], options: Options) -> dict[str, float]:
    """Every metric of one version, named for the device (nothing is logged here)."""
    contents = {precision: path.read_bytes() for precision, path in files.items()}
    metrics: dict[str, float] = {}
    for precision in ("float32", "int8"):
        prefix = f"device_{options.device}_{precision}"
        for i, threads in enumerate(options.threads):
            numbers = measure.latency(
                contents[precision], threads, runs=options.runs, warmup=options.warmup
            )
            for q in ("p50", "p95", "p99"):
                metrics[f"{prefix}_latency_ms_{q}_t{threads}"] = numbers[f"latency_ms_{q}"]
                if i == 0:
                    metrics[f"{prefix}_latency_ms_{q}"] = numbers[f"latency_ms_{q}"]
            if i == 0:
                metrics[f"{prefix}_load_ms"] = numbers["load_ms"]
                metrics[f"{prefix}_peak_rss_mb"] = numbers["peak_rss_mb"]
    if options.images is not None:
        photos = load_images(options.images, measure.input_size(contents["float32"]))
        if photos:
            metrics[f"device_{options.device}_int8_agreement"] = measure.agreement(
                contents["float32"], contents["int8"], photos
            )
            metrics[f"device_{options.device}_images"] = float(len(photos))
    return metrics


class MeasureFailed(RuntimeError):
    """The child measuring a version failed, ran out of its memory or time, or died."""


def measure_in_child(files: dict[str, Path], options: Options) -> dict[str, float]:
    """:func:`measure_files` in a fresh process with the option's memory and time limits."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure_child, args=(files, options, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(options.timeout_s):
            raise MeasureFailed(f"measuring took longer than --timeout-s {options.timeout_s}")
        try:
            kind, value = receive.recv()
        except EOFError:
            child.join(10)
            raise MeasureFailed(
                f"the measuring process died (exit code {child.exitcode}) loading or running it"
            ) from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
    if kind == "error":
        raise MeasureFailed(value)
    return value


def _measure_child(files: dict[str, Path], options: Options, send) -> None:
    import resource

    limit = options.max_memory_mb * 2**20
    with contextlib.suppress(ValueError, OSError):  # a platform without RLIMIT_AS: time only
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        send.send(("ok", measure_files(files, options)))
    except MemoryError:
        send.send(("error", f"out of memory (over --max-memory-mb {options.max_memory_mb})"))
    except Exception as exc:  # noqa: BLE001 -- any failure of an untrusted file is reported
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        send.send(("error", f"a tflite file does not load ({reason[:300]})"))


def ensure_profile(client, options: Options, force: bool = False) -> None:
    """Calibrate and store the device profile when forced or when it lacks a thread count."""
    run = None if force else registry.profile(client, options.device)
    if run is not None and all(
        f"peak_int8_gmacs_t{t}" in run.data.metrics for t in options.threads
    ):
        return
    print(f"calibrating device profile {options.device!r} (threads {options.threads})", flush=True)
    metrics = calibrate.profile_metrics(options.threads)
    registry.store_profile(client, options.device, metrics, facts.facts_json())
    print(
        f"profile {options.device}: float32 {metrics['peak_float32_gmacs']:.1f} GMAC/s, "
        f"int8 {metrics['peak_int8_gmacs']:.1f} GMAC/s "
        f"(experiment {registry.DEVICES_EXPERIMENT})",
        flush=True,
    )


def run_pass(
    client,
    options: Options,
    signals: Signals,
    announce_empty: bool = True,
    skipped: set[int] | None = None,
) -> int:
    """Measure every pending version once; returns how many were measured and logged.

    A watching agent passes ``announce_empty=False`` to stay quiet while nothing new is
    registered, and one ``skipped`` set for all its passes, so that a version it could not
    measure (no files, a file that does not load) is reported once, not at every poll.
    """
    skipped = set() if skipped is None else skipped
    pending = registry.versions_to_measure(client, options.model, options.device, options.versions)
    pending = [version for version in pending if version.version not in skipped]
    if not pending and not announce_empty:
        return 0
    if not pending:
        print(
            f"nothing to measure: every version of {options.model} is measured on {options.device}",
            flush=True,
        )
        return 0
    device_facts = facts.facts_json()
    done = 0
    for index, version in enumerate(pending, start=1):
        where = f"version {version.version}"
        if not version.run_id:
            print(f"{where}: registered without a training run; skipped", flush=True)
            skipped.add(version.version)
            continue
        with tempfile.TemporaryDirectory(prefix="cars-ml-edge-") as tmp:
            try:
                files = registry.download(
                    client, version.run_id, Path(tmp), options.max_file_mb * 10**6
                )
            except registry.Refused as exc:
                print(f"{where}: refused: {exc}; skipped", flush=True)
                skipped.add(version.version)
                continue
            if files is None:
                print(
                    f"{where}: no tflite artifacts (train with export_tflite=true); skipped",
                    flush=True,
                )
                skipped.add(version.version)
                continue
            name = registry.architecture(client, version.run_id)
            print(
                f"{where} ({name}): measuring float32 and int8, threads "
                f"{','.join(map(str, options.threads))} [{index}/{len(pending)}]",
                flush=True,
            )
            try:
                metrics = measure_in_child(files, options)
            except MeasureFailed as exc:
                print(f"{where} ({name}): {exc}; skipped", flush=True)
                skipped.add(version.version)
                continue
        with signals.deferred():
            registry.log_measurement(
                client,
                options.model,
                version,
                options.device,
                metrics,
                options.threads[0],
                device_facts,
            )
        done += 1
        line = (
            f"{where} ({name}): int8 p95 {metrics[f'device_{options.device}_int8_latency_ms_p95']:.3g} ms, "
            f"float32 p95 {metrics[f'device_{options.device}_float32_latency_ms_p95']:.3g} ms"
        )
        agreement = metrics.get(f"device_{options.device}_int8_agreement")
        if agreement is not None:
            line += f", int8 agrees on {agreement:.1%} of the photos"
        print(f"{line} [{index}/{len(pending)}]", flush=True)
    return done
