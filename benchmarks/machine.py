"""What machine a benchmark ran on, for the line every result table carries (a speed claim names its CPU), and
the result line of a benchmark's child process (each measured run is a fresh process)."""

from __future__ import annotations

import json
import platform
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
