"""End-to-end cold-start time of a short caption, this project vs transformers, every dtype in one invocation.

    python benchmarks/cold_start.py --ckpt /tmp/pg-3b-224-f32 --repeat 2

What a user waits for: each run is a FRESH Python process that imports torch, loads what a user of that library
loads to caption an image, turns the prompt (one image + "caption en", 260 tokens) into inputs with it, and
generates exactly --new-tokens (default 20) greedy tokens (EOS ignored), with --threads threads. The clock starts
when the parent spawns the process, so the total includes interpreter start-up and imports. Reported next to the
total: start (spawn -> torch imported), load (ours: `load_hf_model`, the model and its tokenizer, as the CLI loads:
bf16 packed where it pays, int8 quantized from the float checkpoint; transformers: the model's `from_pretrained`
and `AutoProcessor.from_pretrained`), inputs (each side's processor on the image and prompt: the same ids and
pixels up to float rounding), TTFT (vision tower + prefill + first token), decode tokens/s after the first, peak
RSS over the bytes of the loaded weights, the decode's share of the DRAM read ceiling (decoder + LM-head bytes per
token x tokens/s over a 2 GB streaming read measured after the runs), and how many leading greedy tokens equal those of
the first run listed (ours float32 by default). The page cache holds the checkpoint after the first run: "cold"
means a new process, not a cold disk.

Runs (--runs, impl:dtype): ours:float32, ours:bfloat16, ours:int8 (int8 weights, bf16 float parts, quantized
while loading), ours:int8-saved (with --int8-ckpt: the int8 checkpoint `python quantize.py` saved),
transformers:float32, transformers:bfloat16, and transformers-torchao:int8 (transformers with
TorchAoConfig(Int8WeightOnlyConfig()) on bf16, when torchao imports: give its directory with --torchao-path if it
is installed aside). Whole rounds repeat --repeat times, interleaved, and the table shows medians, so the load of a
shared machine hits every row alike. The CPU model, its relevant flags and the load average are printed with the
table. Progress goes to stderr; the table to stdout. No threshold is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import child_result, median_row  # benchmarks/ is on sys.path when a script in it runs
from yardsticks import read_bandwidth

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
RESULT_PREFIX = "COLD_RESULT "
GB = 1e9
DEFAULT_RUNS = ("ours:float32,ours:bfloat16,ours:int8,transformers:float32,transformers:bfloat16,"
                "transformers-torchao:int8")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def _load(impl: str, dtype: str, ckpt: str):
    """-> (model, processor(images) -> inputs, gen(inputs, n, clock) -> ids): what a user of each side loads.
    Ours: load_hf_model (model + tokenizer) and our processor; transformers: from_pretrained and AutoProcessor."""
    import speed
    import torch

    if impl == "ours":
        import utils
        from generation import generate_ids, make_processor

        quant = "int8" if dtype.startswith("int8") else None  # int8-saved: --ckpt is the saved int8 one
        model, tok = utils.load_hf_model(ckpt, "cpu", None if quant else dtype, progress=False, pack=None,
                                         quantize=quant)
        proc = make_processor(model, tok)

        def gen(inputs, n, clock):
            return generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                max_new_tokens=n, eos_token_ids=[], on_token=lambda _t: clock.first())

        return model, lambda images: proc(text=[speed.PROMPT] * len(images), images=images), gen
    extra = {}
    if impl == "transformers-torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        extra = {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
        dtype = "bfloat16"
    model, gen = speed._theirs(argparse.Namespace(impl="transformers", ckpt=ckpt), torch.device("cpu"),
                               getattr(torch, dtype), load_kwargs=extra)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(ckpt)
    return model, lambda images: proc(text=[speed.PROMPT] * len(images), images=images, return_tensors="pt"), gen


def run_child(args) -> dict:
    import resource

    import speed
    import torch

    torch.set_num_threads(args.threads)
    images = speed.benchmark_images(1)  # stands for the user's image file (numpy and PIL imported here)
    t_ready = time.time()
    model, processor, gen = _load(args.impl, args.dtype, args.ckpt)
    t_loaded = time.time()
    inputs = processor(images)
    t_inputs = time.time()
    clock = speed._Clock(torch.device("cpu"))
    clock.start()
    ids = gen(inputs, args.new_tokens, clock)
    t_end = clock.stop()
    first = clock.t_first - clock.t0  # perf_counter seconds; converted to wall time below
    return {
        "impl": args.impl, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "start_s": t_ready - args.spawned, "load_s": t_loaded - t_ready, "inputs_s": t_inputs - t_loaded,
        "ttft_s": first, "decode_tok_s": (args.new_tokens - 1) / (t_end - clock.t_first),
        "total_s": time.time() - args.spawned, "ids": ids[0].tolist(),
        "weight_bytes": speed.weight_bytes(model), "decode_bytes": speed.weight_bytes(model, speed.is_decoder),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measure(args, impl: str, dtype: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--dtype", dtype,
           "--ckpt", args.int8_ckpt if dtype == "int8-saved" else args.ckpt, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    env = dict(os.environ)
    if impl == "transformers-torchao" and args.torchao_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.torchao_path, env.get("PYTHONPATH")]))
    label = f"[{impl} {dtype}]"
    print(f"{label} running (load average {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True)
    spawned = time.time()
    proc = subprocess.run(cmd + ["--spawned", repr(spawned)], stdout=subprocess.PIPE, text=True, env=env,
                          timeout=args.child_timeout)
    r = child_result(proc, label, RESULT_PREFIX)
    if r is None:
        return None
    r["loadavg"] = os.getloadavg()[0]
    print(f"{label} total {r['total_s']:.1f}s = start {r['start_s']:.1f} + load {r['load_s']:.1f} + inputs "
          f"{r['inputs_s']:.2f} + TTFT "
          f"{r['ttft_s']:.2f} + decode {args.new_tokens - 1} x 1/{r['decode_tok_s']:.2f}; peak RSS "
          f"{r['peak_rss'] / GB:.2f} GB (weights {r['weight_bytes'] / GB:.2f} GB)", file=sys.stderr, flush=True)
    return r


def cpu_description() -> str:
    """The CPU model and which of CPU_FLAGS it has, from /proc/cpuinfo (Linux)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} CPUs; flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"


def format_table(rows: list[dict], read_bw: float, new_tokens: int) -> str:
    """One row per run; ratios against transformers' best total and its bf16 decode / TTFT."""
    hf = [r for r in rows if r["impl"] == "transformers"]
    best_total = min((r["total_s"] for r in hf), default=None)
    hf_bf16 = next((r for r in hf if r["dtype"] == "bfloat16"), None)
    ref_ids = rows[0]["ids"]
    head = ("| impl | dtype | total s | start s | load s | inputs s | TTFT s | decode tok/s | total / HF best "
            "| TTFT / HF bf16 "
            f"| decode / HF bf16 | peak RSS GB | RSS / weights | % of decode ceiling | tokens = {rows[0]['impl']} "
            f"{rows[0]['dtype']} |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        same = next((i for i, (a, b) in enumerate(zip(r["ids"], ref_ids, strict=True)) if a != b), len(ref_ids))
        out.append("| " + " | ".join([
            r["impl"], r["dtype"], f"{r['total_s']:.1f}", f"{r['start_s']:.1f}", f"{r['load_s']:.1f}",
            f"{r['inputs_s']:.2f}", f"{r['ttft_s']:.2f}", f"{r['decode_tok_s']:.2f}",
            f"{r['total_s'] / best_total:.2f}" if best_total else "",
            f"{r['ttft_s'] / hf_bf16['ttft_s']:.2f}" if hf_bf16 else "",
            f"{r['decode_tok_s'] / hf_bf16['decode_tok_s']:.2f}" if hf_bf16 else "",
            f"{r['peak_rss'] / GB:.2f}", f"{r['peak_rss'] / r['weight_bytes']:.2f}",
            f"{100 * r['decode_bytes'] * r['decode_tok_s'] / read_bw:.0f}%", f"{same}/{new_tokens}"]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="float checkpoint directory (hub layout)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"impl:dtype, comma-separated (default {DEFAULT_RUNS})")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the table shows medians")
    ap.add_argument("--torchao-path", default=None, help="directory holding torchao, if installed aside "
                    "(pip install --target DIR torchao); put on PYTHONPATH for the torchao run only")
    ap.add_argument("--int8-ckpt", default=None, help="a saved int8 checkpoint of --ckpt (python quantize.py "
                    "CKPT OUT): adds the run ours:int8-saved, which loads it instead of quantizing while loading")
    ap.add_argument("--child-timeout", type=float, default=1800)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--spawned", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(run_child(args)), flush=True)
        return
    args.ckpt = str(Path(args.ckpt).resolve())
    plan = [tuple(run.split(":")) for run in args.runs.split(",")]
    if args.int8_ckpt:
        args.int8_ckpt = str(Path(args.int8_ckpt).resolve())
        plan.insert(next((i + 1 for i, p in enumerate(plan) if p == ("ours", "int8")), len(plan)),
                    ("ours", "int8-saved"))
    cpu = cpu_description()
    print(f"{cpu}; load average {os.getloadavg()[0]:.2f}; {args.ckpt}; {args.threads} threads; "
          f"{args.new_tokens} new tokens", file=sys.stderr)
    runs: dict[tuple, list[dict]] = {p: [] for p in plan}
    for _ in range(args.repeat):
        for impl, dtype in plan:
            r = measure(args, impl, dtype)
            if r:
                runs[(impl, dtype)].append(r)
    rows = [median_row(rs, ("total_s", "start_s", "load_s", "inputs_s", "ttft_s", "decode_tok_s"))
            for rs in runs.values() if rs]
    if not rows:
        sys.exit("every run failed; see above")
    import torch

    torch.set_num_threads(args.threads)
    read_bw = read_bandwidth()
    loads = [r["loadavg"] for rs in runs.values() for r in rs]
    print(f"\n{cpu}; torch {torch.__version__}; {args.threads} threads; one image + 'caption en' (260 tokens), "
          f"{args.new_tokens} new tokens, greedy, EOS ignored; median of {args.repeat} interleaved round(s); load "
          f"average after the runs {min(loads):.2f}-{max(loads):.2f}; DRAM read {read_bw / GB:.1f} GB/s\n")
    print(format_table(rows, read_bw, args.new_tokens))


if __name__ == "__main__":
    main()
