"""The benchmark's goals, the machine it ran on, and the markdown table of results."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Goal:
    """A target for one metric, from issue 7 (set for MobileNet at 224 px)."""

    op: str  # ">=", "<=", "<" or "=="
    target: float

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.op == ">=":
            return value >= self.target
        if self.op == "<=":
            return value <= self.target
        if self.op == "<":
            return value < self.target
        return value == self.target

    def text(self) -> str:
        target = f"{self.target:g}"
        return {
            ">=": f">= {target}x",
            "<=": f"<= {target}",
            "<": f"< {target}",
            "==": f"= {target}",
        }[self.op]


GOALS: dict[str, Goal] = {
    "speedup_vs_keras_predict": Goal(">=", 6.0),
    "serve_p50_ms": Goal("<", 15.0),
    "serve_errors": Goal("==", 0.0),
    "serve8_errors": Goal("==", 0.0),
    "serve_int8_errors": Goal("==", 0.0),
    "serve8_int8_errors": Goal("==", 0.0),
    "int8_latency_over_floor": Goal("<=", 3.0),
    "pipeline_speedup_vs_seed_loader": Goal(">=", 5.0),
    # "Data never the bottleneck": side-by-side step timings on shared cores scatter by a few
    # percent, so waiting for under a tenth of a step is read as no wait.
    "data_wait_fraction": Goal("<", 0.1),
    "tuning_trial_speedup_cached_features": Goal(">=", 20.0),
}


def _cpuinfo(key: str) -> str:
    """The first ``key : value`` line of /proc/cpuinfo (``model name``, ``flags``), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, load, date and library versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "cpu_cores_usable": str(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ),
        "load_average_1m_at_start": f"{load[0]:.2f}",
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        # TensorFlow enables oneDNN by itself only with AVX-512 VNNI or AMX (perf/cpu_kernels.py).
        "cpu_avx512_vnni": str("avx512_vnni" in _cpuinfo("flags").split()).lower(),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        **{
            f"version_{n}": _version(n)
            for n in ("tensorflow-cpu", "keras", "mlflow", "ai-edge-litert", "numpy", "pillow")
        },
    }


def _fmt(name: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if name == "model_macs":
        return f"{value / 1e6:,.0f} M"
    if name.endswith("errors"):
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def markdown_table(metrics: Mapping[str, float], info: Mapping[str, str]) -> str:
    """Every metric with its goal and pass/miss, headed by the machine and the date."""
    lines = [
        f"Benchmark on {info.get('cpu_model', '?')}, {info.get('cpu_cores', '?')} cores, "
        f"{info.get('date_utc', '?')} UTC (load average at start "
        f"{info.get('load_average_1m_at_start', '?')}; machine shared with other jobs, so compare "
        "ratios measured side by side, not absolute times).",
        "",
        "| metric | value | goal | result |",
        "| --- | ---: | --- | --- |",
    ]
    for name, value in metrics.items():
        goal = GOALS.get(name)
        verdict = ("pass" if goal.met(value) else "**miss**") if goal else ""
        lines.append(
            f"| `{name}` | {_fmt(name, value)} | {goal.text() if goal else ''} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def goal_summary(metrics: Mapping[str, float]) -> dict[str, bool]:
    """``{metric: met}`` for every goal whose metric was measured."""
    return {name: goal.met(metrics[name]) for name, goal in GOALS.items() if name in metrics}
