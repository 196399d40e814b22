"""Which matmul kernel to run int8 weights with, on this CPU: the measurement behind quantize.int8_linear's choice.

    python benchmarks/int8_kernels.py [--matrices 4]

One PaliGemma-3B MLP projection (2048 -> 16384), at the decode shape (1 activation row) and the prefill shape (260
rows), cycling through --matrices different weights so they come from DRAM, not the cache (a single 16384 x 2048
matrix fits many L3s). Candidates: the float baselines (bf16 F.linear, float32 through oneDNN as ops.linear runs
it), `torch._weight_int8pack_mm` with bf16 and with float32 activations, and dequantize-then-dense-matmul
(quantize.int8_linear's many-row path, into its reused buffer) in float32 and bf16, and PyTorch's dynamic int8
kernel (fbgemm, which quantizes the activations too; with its prepack time). Prints ms per matmul and the
weight bytes read per second; the CPU model and flags on top. Slow combinations on CPUs without the matching
units (several seconds per call) are skipped with --quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import cpu_description  # noqa: E402

import ops  # noqa: E402
import quantize  # noqa: E402

N, K = 16384, 2048


def _ms(fn, mats, rounds: int = 2) -> float:
    fn(mats[0])
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for m in mats:
            fn(m)
        best = min(best, (time.perf_counter() - t0) / len(mats))
    return best * 1e3


def _fbgemm_packed(q: list) -> dict | None:
    """PyTorch's dynamic-quantization kernel (fbgemm): it also rounds the activations to 8 bits per call, which
    weight-only int8 does not, and its weights must be prepacked. Measured for the record, with the prepack time
    (a load-time cost per matrix); None where the fbgemm engine is missing."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "fbgemm"
    t0 = time.perf_counter()
    packed = {}
    for m in q:
        w = torch.quantize_per_channel(m[0].float() * m[1][:, None], m[1].double(), torch.zeros(N, dtype=torch.long),
                                       0, torch.qint8)
        packed[id(m)] = torch.ops.quantized.linear_prepack(w, None)
    print(f"fbgemm prepack: {(time.perf_counter() - t0) / len(q) * 1e3:.0f} ms per {N} x {K} matrix\n")
    return packed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="skip float32 activations into the int8 kernel at 260 "
                    "rows and bf16 dense at 260 rows on CPUs without bf16 arithmetic")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    slow_bf16 = not ops.cpu_has_bf16_arithmetic()
    print(f"{cpu_description()}; torch {torch.__version__}; {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| kernel | weights | rows | ms per matmul | weight GB/s |\n|---|---|---|---|---|")
    q = [quantize.quantize_rows(torch.randn(N, K)) for _ in range(args.matrices)]
    packed = _fbgemm_packed(q)
    for rows in (1, 260):
        xb, xf = torch.randn(rows, K).to(torch.bfloat16), torch.randn(rows, K)
        cases = [
            ("_weight_int8pack_mm, bf16 activations",
             lambda m, x=xb: torch._weight_int8pack_mm(x, m[0], m[1].to(torch.bfloat16)), True),
            ("_weight_int8pack_mm, float32 activations",
             lambda m, x=xf: torch._weight_int8pack_mm(x, m[0], m[1]), rows == 1 or not args.quick),
            ("dequantize + float32 oneDNN", lambda m, x=xf: ops.linear(x, quantize.dequantize(*m, torch.float32)),
             True),
            ("dequantize + bf16 F.linear", lambda m, x=xb: F.linear(x, quantize.dequantize(*m, torch.bfloat16)),
             rows == 1 or not (args.quick and slow_bf16)),
            ("quantize.int8_linear (the choice)", lambda m, x=xb if rows == 1 else xf: quantize.int8_linear(x, *m),
             True),
        ]
        if packed is not None:
            cases.append(("fbgemm dynamic int8 (int8 activations too; not used)",
                          lambda m, x=xf: torch.ops.quantized.linear_dynamic(x, packed[id(m)], True), True))
        for name, fn, run in cases:
            if run:
                ms = _ms(fn, q)
                print(f"| {name} | int8 | {rows} | {ms:.2f} | {N * K / ms / 1e6:.1f} |", flush=True)
    del q
    for dtype, name in ((torch.bfloat16, "bf16 F.linear"), (torch.float32, "float32 oneDNN (ops.linear)")):
        w = [torch.randn(N, K).to(dtype) for _ in range(args.matrices)]
        for rows in (1, 260):
            if dtype == torch.bfloat16 and rows > 1 and args.quick and slow_bf16:
                continue
            x = torch.randn(rows, K).to(dtype)
            ms = _ms(lambda m, x=x: ops.linear(x, m), w)
            print(f"| {name} | {str(dtype)[6:]} | {rows} | {ms:.2f} | {N * K * w[0].element_size() / ms / 1e6:.1f} |",
                  flush=True)
        del w


if __name__ == "__main__":
    main()
