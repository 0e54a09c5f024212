"""The device's facts, logged as tags beside every measurement and profile."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (``model name``, or a Raspberry Pi's ``Model``)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if found.get(key):
            return found[key]
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The cores this process may run on (a ``taskset`` pin counts), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_facts() -> dict[str, object]:
    """CPU model, usable cores, machine, OS, Python and LiteRT versions."""
    try:
        litert = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        litert = "unknown"
    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "litert": litert,
    }


def facts_json() -> str:
    return json.dumps(device_facts(), sort_keys=True)
