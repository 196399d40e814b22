"""Machine yardsticks that speed.py's tables are read against, and its fused-projection micro-benchmark: timings of
bare tensor operations on random data, with no model loaded.

- `best_time`: seconds per call of a function, the best of a few rounds (the timer every measure here shares);
- `read_bandwidth`: bytes/s a streaming sum over 2 GB reads (the CPU decode ceiling);
- `copy_bandwidth`: bytes/s of a device-to-device copy (the CUDA decode ceiling);
- `gemv_bandwidth`: bytes of weights/s a matrix-vector product with the LM head's width reads;
- `projection_micro`: q/k/v and gate/up as separate matmuls vs one fused matmul, PaliGemma-3B shapes.

Used by speed.py (the parent after its children; the copy bandwidth in each CUDA child) and cold_start.py.
Checked against: nothing external, these are measurements; the shapes are paligemma-3b-224's
(../shared/PALIGEMMA_FACTS.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best_time(fn: Callable[[], object], reps: int, sync: Callable[[], object], rounds: int = 3) -> float:
    """Seconds per call: the best of `rounds` rounds of `reps` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def read_bandwidth() -> float:
    """Bytes per second a streaming reduction reads from DRAM (a sum over 2 GB): the CPU decode ceiling, since a
    decoded token must read every decoder and LM-head weight once."""
    import torch

    a = torch.ones(500_000_000)  # 2 GB of float32, far beyond the caches
    return a.numel() * a.element_size() / best_time(lambda: a.sum(), 2, lambda: None)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (the decode ceiling's yardstick)."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / best_time(lambda: b.copy_(a), 10, torch.cuda.synchronize)


def gemv_bandwidth(device: str, dtype_name: str) -> float:
    """Bytes of weights per second a (1, 2048) x (2048, 131072) matrix-vector product reads, the better of ATen's
    F.linear and our `linear` (oneDNN for float32 on CPU): for comparison with the read ceiling."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from ops import linear

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    w = torch.randn(8 * 16384, 2048, device=device).to(dtype)
    x = torch.randn(1, 2048, device=device).to(dtype)
    best = min(best_time(lambda: F.linear(x, w), 10, sync), best_time(lambda: linear(x, w), 10, sync))
    return w.numel() * w.element_size() / best


def projection_micro(device: str, dtype_name: str, layers: int = 6) -> list[list[str]]:
    """ms per decoder layer for q/k/v and gate/up as separate matmuls vs one fused matmul (PaliGemma-3B shapes),
    at decode (1 token) and prefill (260 tokens): what fusing the projections would buy here. One row per
    (projections, phase): the cells of speed_table.projection_table."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def mats(rows):  # `layers` distinct weights, so each layer's read comes from memory, not cache
        return [torch.randn(r, 2048, device=device).to(dtype) for r in rows for _ in range(layers)]

    rows = []
    for name, shapes in (("q/k/v", (2048, 256, 256)), ("gate/up", (16384, 16384))):
        ws = [mats([r]) for r in shapes]  # ws[j][i]: matrix j of layer i
        fused = [torch.cat([w[i] for w in ws]) for i in range(layers)]
        for T in (1, 260):
            x = torch.randn(1, T, 2048, device=device).to(dtype)
            reps = 10 if T == 1 else 3
            sep = best_time(lambda x=x, ws=ws: [F.linear(x, w[i]) for i in range(layers) for w in ws], reps, sync)
            fus = best_time(lambda x=x, fused=fused: [F.linear(x, f) for f in fused], reps, sync)
            sep, fus = sep / layers, fus / layers
            rows.append([name, dtype_name, "decode" if T == 1 else "prefill 260", f"{sep * 1e3:.3f}",
                         f"{fus * 1e3:.3f}", f"{(sep - fus) / sep * 100:+.1f}%"])
    return rows
