"""What the NaN/Inf check of every weight (weights.check_finite) costs at load, on a full-size checkpoint.

    python benchmarks/finite_check.py CKPT_DIR [--dtypes bfloat16,float32] [--rounds 2]

For each dtype and round, two FRESH child processes load CKPT_DIR on the CPU with `utils.load_hf_model`: one as
shipped (every tensor checked), one with the check switched off. A load without the check may hand back weights
that are still unread pages of the memory-mapped file (zero-copy when the dtype matches), which the first forward
pass then reads; so each child also reads every weight once after the load ("load + first read"), which is what a
run pays either way. Reported: load seconds with and without the check, load + first read with and without, and
the seconds spent inside the check itself (timed around each call). Children alternate (with, without, with, ...)
so drift and other load on the machine hit both; medians over rounds. The shards are read once before the first
child, so every load starts from the page cache. The CPU model and the load average are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/ is on sys.path when a script in it runs

REPO = Path(__file__).resolve().parent.parent
RESULT = "FINITE_CHECK_RESULT "


def child(ckpt: str, dtype: str, check: bool) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    import weights
    from utils import load_hf_model

    spent = [0.0]
    real = weights.check_finite

    def timed(*args):
        start = time.perf_counter()
        try:
            real(*args)
        finally:
            spent[0] += time.perf_counter() - start

    weights.check_finite = timed if check else (lambda *args: None)
    import transformers  # noqa: F401 — imported before the clock in both children (the tokenizer needs it)

    start = time.perf_counter()
    model, _ = load_hf_model(ckpt, "cpu", dtype, progress=False)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[:: max(1, 4096 // p.element_size())].float().sum()  # one read per 4 KiB page
    total_s = time.perf_counter() - start
    print(RESULT + json.dumps({"load_s": load_s, "total_s": total_s, "check_s": spent[0]}), flush=True)




def run_child(ckpt: str, dtype: str, check: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, ckpt, "--child", dtype, "--check", str(int(check))],
                         capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line[len(RESULT):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--check", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.ckpt, args.child, bool(args.check))
        return
    for shard in Path(args.ckpt).glob("*.safetensors"):  # warm the page cache once
        with open(shard, "rb") as f:
            while f.read(64 << 20):
                pass
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"checkpoint {args.ckpt}")
    print("| dtype | load s, checked | load s, unchecked | load + first read s, checked | "
          "load + first read s, unchecked | inside the check s |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.rounds):
            for check in (True, False):
                runs[check].append(run_child(args.ckpt, dtype, check))
                print(f"  {dtype} check={check}: {runs[check][-1]}", file=sys.stderr)
        med = {(check, key): statistics.median(r[key] for r in runs[check])
               for check in (True, False) for key in ("load_s", "total_s", "check_s")}
        print(f"| {dtype} | {med[True, 'load_s']:.2f} | {med[False, 'load_s']:.2f} | {med[True, 'total_s']:.2f} | "
              f"{med[False, 'total_s']:.2f} | {med[True, 'check_s']:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
