"""Captioning throughput with --output: one process with all the threads against torchrun's processes, each with
its share of the threads, on the same images, checkpoint and settings.

    python benchmarks/batch_throughput.py --ckpt /tmp/tiny/pg1-legacy-mqa --images 32 --new-tokens 8
    python benchmarks/batch_throughput.py --ckpt /tmp/pg-3b-224-f32 --dtype bfloat16 --images 4 --new-tokens 8

Writes --images noise images (320x240 JPEG, seeded) and their list into a temporary directory, then runs, one
after the other, each in fresh processes: `inference.py ... --image_list LIST --output OUT --verbose` as one
process with --threads threads (OMP_NUM_THREADS), and `torch.distributed.run --standalone --nproc_per_node P`
with --threads / P threads per rank (ranks.Rank.bind divides the cores the same way). Greedy
decoding, --new-tokens at most (EOS may stop a row earlier: both runs answer the same images, so they stop
alike). Reports the command's wall time (interpreter start, model load, answering, merge); the images/s of the
summary line (from rank 0's plan, before its model load, to the merged file); the images/s answering (the images
over the longest rank's --verbose span, which starts after its model load); and whether the two files are
byte-identical. Prints a markdown table on stdout, with the CPU model, the thread counts and the load average
before and after (the machine may be shared: read the numbers with it). No threshold is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/ is on sys.path when a script in it runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]




def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, images/s from the summary line, images/s answering) of one command. Answering: the images over
    the longest rank's --verbose span (its first batch to its last, after its model load; the ranks load in
    parallel, so their spans overlap)."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rate = re.search(r"\(([\d.]+) images/s", done.stdout)
    spans = [(int(n), float(s)) for n, s in re.findall(r"note: (\d+) images in \d+ batch\w*, ([\d.]+) s", done.stderr)]
    answering = sum(n for n, _ in spans) / max(s for _, s in spans) if spans else float("nan")
    return wall, float(rate.group(1)) if rate else float("nan"), answering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (default: cores)")
    parser.add_argument("--procs", type=int, default=2, help="torchrun processes (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray((rng.random((240, 320, 3)) * 255).astype("uint8")).save(d / f"{i:05d}.jpg")
        (d / "list.txt").write_text("".join(f"{i:05d}.jpg\n" for i in range(args.images)))
        common = ["--model_path", args.ckpt, "--prompt", "caption en", "--image_list", str(d / "list.txt"),
                  "--max_tokens_to_generate", str(args.new_tokens), "--batch_size", str(args.batch_size),
                  "--dtype", args.dtype, "--verbose"]
        env = {"TQDM_DISABLE": "1"}
        load_before = os.getloadavg()
        per_rank = max(1, args.threads // args.procs)
        rows = [(f"1 process x {args.threads} threads",
                 run([sys.executable, "inference.py", *common, "--output", str(d / "one.jsonl")],
                     {**env, "OMP_NUM_THREADS": str(args.threads)})),
                (f"{args.procs} processes x {per_rank} thread{'s' * (per_rank != 1)} (torchrun)",
                 run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                      str(args.procs), "inference.py", *common, "--output", str(d / "many.jsonl")], env))]
        load_after = os.getloadavg()
        same = (d / "one.jsonl").read_bytes() == (d / "many.jsonl").read_bytes()

    print(f"{cpu_model()}, {os.cpu_count()} cores; checkpoint {args.ckpt} ({args.dtype}); {args.images} images "
          f"320x240, 'caption en', greedy, at most {args.new_tokens} new tokens, batch {args.batch_size}; load "
          f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after; files byte-identical: {same}\n")
    print("| layout | wall s (start to merged file) | images/s with the model load | images/s answering | "
          "answering vs 1 process |")
    print("|---|---|---|---|---|")
    base = rows[0][1][2]
    for name, (wall, rate, answering) in rows:
        print(f"| {name} | {wall:.1f} | {rate:.3g} | {answering:.3g} | {answering / base:.2f}x |")


if __name__ == "__main__":
    main()
