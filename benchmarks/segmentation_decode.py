"""Time decoding segmentation masks on the CPU: 16 objects' codes -> 16 masks of 64 × 64 (MaskVAE.decode), and
parse_segments on a 16-object answer for a 640 × 480 image (decode + paste into the image). Random weights in
the real vae-oid.npz decoder shapes (timings do not depend on the values).

    python benchmarks/segmentation_decode.py                       # this project (PyTorch)
    /tmp/bvenv/bin/python benchmarks/segmentation_decode.py --big_vision /tmp/big_vision   # the JAX reference

The second form times big_vision's own jitted `reconstruct_masks` on the same weights (same seed) in the venv that
tests/data/make_segmentation_golden.py uses; it needs no torch. Prints a markdown row: the CPU model, threads, the
median of --repeat runs after one warm-up, and the
load average (on a shared machine, fewer threads than cores can be much faster: rerun with --threads 1).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/ is on sys.path when a script in it runs

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from data.make_segmentation_golden import float_weights, random_weights, stub_modules  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (and, for JAX, compilation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big_vision", help="time big_vision's reconstruct_masks instead (a checkout's path)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args()
    weights = {k: v for k, v in float_weights(random_weights(np.random.default_rng(0))).items()
               if not k.startswith("encoder.")}
    codes = np.random.default_rng(1).integers(0, 128, (16, 16)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vae-oid.npz")
        np.savez(path, **weights)
        if args.big_vision:
            sys.path.insert(0, os.path.abspath(args.big_vision))
            stub_modules()
            import jax
            from big_vision.evaluators.proj.paligemma.transfers import segmentation as bv_eval

            reconstruct = bv_eval.get_reconstruct_masks(path)
            decode_ms = median_ms(lambda: jax.block_until_ready(reconstruct(codes)), args.repeat)
            who, parse_ms, threads = f"big_vision (jax {jax.__version__}, jit)", "-", "-"
        else:
            import torch

            from segmentation import load_vae, parse_segments

            if args.threads:
                torch.set_num_threads(args.threads)

            vae = load_vae(path)
            decode_ms = median_ms(lambda: vae.decode(torch.from_numpy(codes)), args.repeat)
            answer = " ; ".join("<loc0100><loc0100><loc0900><loc0900>" + "".join(f"<seg{c:03d}>" for c in row) +
                                f" thing {i}" for i, row in enumerate(codes))
            parse_ms = f"{median_ms(lambda: parse_segments(answer, 640, 480, vae), args.repeat):.1f}"
            who, threads = f"this project (torch {torch.__version__})", str(torch.get_num_threads())
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "-"
    print("| implementation | CPU | threads | load average | decode 16 masks, ms | parse_segments 16 objects 640×480, "
          "ms |")
    print("|---|---|---|---|---|---|")
    print(f"| {who} | {cpu_model()} ({os.cpu_count()} cores) | {threads} | {load} | {decode_ms:.1f} | {parse_ms} |")


if __name__ == "__main__":
    main()
