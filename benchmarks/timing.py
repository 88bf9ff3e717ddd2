"""Repeated timings summarised as a median and its spread, and a description of the machine.

On a shared machine single timings mean little: every figure is the median of several runs,
shown with the lowest and highest, and figures compared with each other (a sampler against a
forward pass) are timed in alternation within each run, their ratio taken run by run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Values of repeated runs (seconds, or a rate derived from them)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def low(self) -> float:
        return float(np.min(self.values))

    @property
    def high(self) -> float:
        return float(np.max(self.values))

    def map(self, fn: Callable[[float], float]) -> Stats:
        """Each run's value through `fn` (e.g. seconds -> images per second)."""
        return Stats(tuple(fn(v) for v in self.values))

    def over(self, other: Stats) -> Stats:
        """Run-by-run ratio `self / other` of two series timed in alternation."""
        return Stats(tuple(a / b for a, b in zip(self.values, other.values, strict=True)))

    def show(self, digits: int = 3, scale: float = 1.0) -> str:
        """`median (low-high, n runs)` with `digits` significant digits, values times `scale`."""

        def fmt(value: float) -> str:
            return f"{value * scale:.{digits}g}"

        if len(self.values) == 1:
            return f"{fmt(self.median)} (1 run)"
        return f"{fmt(self.median)} ({fmt(self.low)}-{fmt(self.high)}, {len(self.values)} runs)"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds `fn()` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, Stats]:
    """Seconds per call of each function, called in turn `repeats` times (paired runs)."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            seconds[name].append(timed(fn)[0])
    return {name: Stats(tuple(values)) for name, values in seconds.items()}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" (with uncommitted changes)" if dirty else "")


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    import keras
    import tensorflow as tf

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": _cpu_model(),
        "CPU count": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": _memory(),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "TensorFlow": tf.__version__,
        "Keras": keras.__version__,
        "NumPy": np.__version__,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (oneDNN on)"),
        "keras_vqpix commit": _git_commit(),
    }
