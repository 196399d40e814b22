"""What machine a benchmark ran on, for the line every result table carries (a speed claim names its CPU), the
result line of a benchmark's child process (each measured run is a fresh process), and the one row a table shows
for a configuration measured in several rounds."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def child_result(proc: subprocess.CompletedProcess, label: str, prefix: str) -> dict | None:
    """The last `prefix` line of a finished child's stdout as a dict, or None (its output's tail shown) if it
    failed."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:])
        print(f"{label} FAILED (exit {proc.returncode})", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1][len(prefix):])


def median_row(rs: list[dict], keys: tuple[str, ...]) -> dict:
    """One row from repeated runs of one configuration: the median of each of `keys` (times, speeds), the highest
    memory peak (peak_rss, and peak_cuda where present), the first run's other fields (its tokens), runs = len(rs)."""
    out = dict(rs[0], runs=len(rs))
    for key in keys:
        out[key] = statistics.median(r[key] for r in rs)
    for key in ("peak_rss", "peak_cuda"):
        if key in out:
            out[key] = max(r[key] for r in rs)
    return out
