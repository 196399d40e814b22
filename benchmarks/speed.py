"""Generation speed, this project vs transformers, on the same checkpoint, side by side in one invocation.

    python benchmarks/speed.py --ckpt /tmp/pg-3b-224-f32 --dtypes float32,bfloat16           # CPU
    python benchmarks/speed.py --make /tmp/pg-3b-224-bf16 --ckpt-dtype bfloat16 --device cuda  # GPU

Every measurement runs in a FRESH subprocess, one after another (so peak memory and caches are each run's own):
load the checkpoint, then one greedy generation of the same prompt (one image + "caption en", 260 tokens) for
exactly --new-tokens tokens (EOS ignored by both), with the same thread count. The parent prints a markdown
table to stdout, with ours/transformers ratios against the transformers run of the same dtype (and, on CPU,
against transformers' fastest CPU setting):

- load s: checkpoint directory -> model ready (ours includes the tokenizer);
- peak RSS (host) and, on CUDA, peak allocated device memory; weights = bytes of the model's tensors;
- TTFT: time to first token = vision tower + prefill + first token, from token ids already built;
- decode tok/s: (new tokens - 1) / time from the first to the last token;
- same tokens: whether the run's greedy ids equal transformers' of the same dtype.

- % of decode ceiling: bytes of decoder + LM-head weights per token x tokens/s, over the DRAM read bandwidth
  (CPU: a streaming sum over 2 GB) or a device-to-device copy (CUDA), measured in the same invocation.

Ablation rows (`--ablate`) rerun ours with one optimisation switched off, so the table shows what each bought:
`ATen/MKL float32 linear` (ATen's default matmul kernels instead of oneDNN: `ops.ONEDNN_LINEAR = False`, which
also leaves bf16 weights unpacked), `1 thread`, `logits at every prompt position` (the 257k-row LM head over all
260 prompt positions instead of the last), `fp32 prefill` / `bf16 prefill` (the arithmetic dtype of the prefill of
bf16 weights; the default picks per CPU), `bf16 weights not packed` (bf16 Linear weights left in the checkpoint's
layout instead of oneDNN's blocked one). A second
table times q/k/v and gate/up as separate matmuls vs one fused matmul (what fusing the projections would buy).
`--repeat N` runs N whole rounds and reports medians.

On CUDA it adds, per run, the share of the bandwidth ceiling reached in decode (bytes of decoder + lm_head
weights read per token x tokens/s, over a device-to-device copy measured in the same process) and batch
captioning throughput (images/s for --batch-sizes images x 32 new tokens, including prefill). transformers runs
twice there: its default dynamic cache (`transformers`) and a static cache, which transformers compiles itself
(`transformers-static`); ours runs eager (`ours`) and with the decode step compiled into a CUDA graph
(`ours-compiled`). Warm-up generations (--warmup; `default_warmup`: 1 on CUDA, 2 for the compiled ones, whose
CUDA graphs are recorded on a function's second call and replayed from its third) absorb compilation.

GPU, one command (make the bf16 checkpoint, then all four implementations; ~6 min on an H100/H200):

    python benchmarks/speed.py --make /tmp/pg-3b-224-bf16 --ckpt-dtype bfloat16 --device cuda --new-tokens 128

This file is the measurement (the child) and the schedule of runs (the parent); speed_table.py renders the tables,
yardsticks.py measures the bandwidths and the fused-projection micro-benchmark.

Progress and diagnostics go to stderr. No threshold is asserted: these machines are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# benchmarks/ is on sys.path when a script in it runs
from machine import child_result, median_row
from speed_table import GB, format_table, projection_table
from yardsticks import copy_bandwidth, gemv_bandwidth, projection_micro, read_bandwidth

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "SPEED_RESULT "
PROMPT = "caption en"
# Compiled with CUDA graphs ("reduce-overhead"), which are recorded on a function's second call and replayed from
# its third: warmed twice by default, and measured at one batch size (each new shape compiles and records anew).
COMPILED = ("ours-compiled", "transformers-static")


def default_warmup(impl: str, device: str) -> int:
    """Warm-up generations before timing when --warmup is not given: none on CPU (cold, as a user runs it); on
    CUDA one (first calls compile / autotune), two for the COMPILED implementations."""
    return 0 if device == "cpu" else 2 if impl in COMPILED else 1


# ---------------------------------------------------------------------------------------------------------------
# child: one load + one generation, in its own process
# ---------------------------------------------------------------------------------------------------------------

def _inputs(ckpt: str, batch: int = 1) -> dict:
    """Token ids, mask and pixels of the benchmark prompt, built by our processor (identical for both impls)."""
    sys.path.insert(0, str(REPO))
    import utils
    from processing_paligemma import PaliGemmaProcessor

    config = utils.load_config(ckpt)
    tok = utils.load_tokenizer(ckpt, config)
    vc = config.vision_config
    proc = PaliGemmaProcessor(tok, vc.num_image_tokens, vc.image_size)
    return proc(text=[PROMPT] * batch, images=benchmark_images(batch))


def benchmark_images(batch: int = 1) -> list:
    """The benchmark's images: 320 x 240 RGB noise, the same every run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((240, 320, 3)) * 255).astype("uint8")) for _ in range(batch)]


class _Clock:
    """Timestamps of the first and the last new token (device work finished at each, via synchronize)."""

    def __init__(self, device) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t_first: float | None = None
        self.t0 = 0.0

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def first(self) -> None:
        if self.t_first is None:
            self.sync()
            self.t_first = time.perf_counter()

    def stop(self) -> float:
        self.sync()
        return time.perf_counter()


def _ours(args, device, dtype):
    """Load ours; returns (model, tokenizer, generate(inputs, n, clock) -> ids)."""
    import torch

    sys.path.insert(0, str(REPO))
    import generation
    import ops
    import utils
    from generation import generate_ids

    if args.aten_linear:  # ablation: ATen's default float32 matmuls (MKL) instead of oneDNN, and no packing
        ops.ONEDNN_LINEAR = False
    # pack=None: as the CLI does (bf16 weights packed for oneDNN on CPUs with bf16 arithmetic)
    model, _tok = utils.load_hf_model(args.ckpt, device, dtype, pack=False if args.unpacked else None)
    prefill_dtype = getattr(torch, args.prefill_dtype) if args.prefill_dtype else None
    if args.all_logits:  # ablation: what a port without num_logits_to_keep does, the LM head at every position
        def prefill_all(model, input_ids, pixel_values, attention_mask, kv_cache, position_ids, compute_dtype=None):
            out = model(input_ids, pixel_values, attention_mask, kv_cache=kv_cache,
                        input_pos=torch.arange(input_ids.shape[1], device=input_ids.device),
                        position_ids=position_ids, compute_dtype=compute_dtype)
            return out["logits"][:, -1]

        generation.prefill = prefill_all  # generate_ids looks prefill up in generation at call time

    def gen(inputs, n, clock=None):
        return generate_ids(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                            max_new_tokens=n, eos_token_ids=[], compile=args.impl == "ours-compiled",
                            prefill_dtype=prefill_dtype, on_token=(lambda _t: clock.first()) if clock else None)

    return model, gen


def _theirs(args, device, dtype, load_kwargs: dict | None = None):
    """Load transformers' model (load_kwargs: more from_pretrained arguments, e.g. a quantization_config)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(args.ckpt, dtype=dtype,
                                                                         **(load_kwargs or {})).to(device).eval()

    class Streamer:  # transformers calls put() with the prompt first, then with every new token
        def __init__(self, clock):
            self.clock, self.calls = clock, 0

        def put(self, _value):
            self.calls += 1
            if self.calls == 2:
                self.clock.first()

        def end(self):
            pass

    extra = {}
    if args.impl == "transformers-static":
        extra = {"cache_implementation": "static"}  # transformers compiles the static-cache forward itself

    def gen(inputs, n, clock=None):
        with torch.inference_mode():
            out = model.generate(
                input_ids=inputs["input_ids"].to(device), pixel_values=inputs["pixel_values"].to(device, dtype),
                attention_mask=inputs["attention_mask"].to(device),
                token_type_ids=torch.zeros_like(inputs["input_ids"]).to(device),  # all prompt: prefix-LM block
                max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Streamer(clock) if clock else None,
                **extra)
        return out[:, inputs["input_ids"].shape[1]:]

    return model, gen


def _key(t) -> object:
    """Identity of a tensor's memory; packed oneDNN weights have no data_ptr but are never shared."""
    return id(t) if t.is_mkldnn else t.data_ptr()


def is_decoder(name: str) -> bool:
    """Whether a weight is read per decoded token: every decoder weight and the (tied) 257k-row embedding as the LM
    head; not the vision tower nor the projector, which run once per image."""
    return "vision" not in name and "multi_modal" not in name


def weight_bytes(model, keep: Callable[[str], bool] = lambda name: True) -> int:
    """Bytes of the model's tensors whose names pass `keep`, each block of memory once (transformers'
    lm_head.weight is the embedding itself); torchao's int8 tensors count their int8 data and scales."""
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if keep(name):
            for part in [getattr(t, a) for a in ("qdata", "scale") if hasattr(t, a)] or [t]:
                if _key(part) not in seen:
                    seen.add(_key(part))
                    total += part.numel() * part.element_size()
    return total


def run_child(args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inputs = _inputs(args.ckpt)
    t0 = time.perf_counter()
    model, gen = (_ours if args.impl.startswith("ours") else _theirs)(args, device, dtype)
    load_s = time.perf_counter() - t0
    for _ in range(args.warmup):  # CUDA: first calls compile / autotune; CPU runs cold (warmup 0)
        gen(inputs, args.new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = _Clock(device)
    clock.start()
    ids = gen(inputs, args.new_tokens, clock)
    t_end = clock.stop()
    res = {
        "impl": args.impl, "variant": args.variant, "dtype": args.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "load_s": load_s, "ttft_s": clock.t_first - clock.t0,
        "decode_tok_s": (args.new_tokens - 1) / (t_end - clock.t_first), "new_tokens": args.new_tokens,
        "prompt_len": int(inputs["input_ids"].shape[1]), "ids": ids[0].tolist(),
        "weight_bytes": weight_bytes(model), "decode_bytes": weight_bytes(model, is_decoder),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        res["peak_cuda"] = torch.cuda.max_memory_allocated(device)
        res["copy_bw"] = copy_bandwidth(device)
    res["images_s"] = {}
    # Partial results as they come (the parent keeps the last line), so a child killed at its time budget still
    # reports what it measured.
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    if args.batch_sizes:
        # The compiled runs compile (and record CUDA graphs) once per shape: the first size listed only (the
        # largest by default), warmed as often as the batch-1 run was.
        compiled = args.impl in COMPILED
        sizes = args.batch_sizes[:1] if compiled else args.batch_sizes
        for b in sizes:
            batch = _inputs(args.ckpt, b)
            for _ in range(max(1, args.warmup) if compiled else 1):  # warm this shape
                gen(batch, 32)
            clock = _Clock(device)
            clock.start()
            gen(batch, 32)
            res["images_s"][b] = b / (clock.stop() - clock.t0)
            print(f"  batch {b}: {res['images_s'][b]:.1f} images/s", file=sys.stderr, flush=True)
            print(RESULT_PREFIX + json.dumps(res), flush=True)
    return res


# ---------------------------------------------------------------------------------------------------------------
# parent: spawn children, print the table
# ---------------------------------------------------------------------------------------------------------------

# name -> extra child flags; each ablation switches ONE optimisation of ours off (or picks the other option).
ABLATIONS = {
    "ATen/MKL float32 linear": ["--aten-linear"],
    "1 thread": ["--threads", "1"],
    "bf16 weights not packed": ["--unpacked"],
    "logits at every prompt position": ["--all-logits"],
    "fp32 prefill": ["--prefill-dtype", "float32"],
    "bf16 prefill": ["--prefill-dtype", "bfloat16"],
}



def measure(args, impl: str, dtype: str, variant: str = "", extra: list[str] | None = None) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--dtype", dtype,
           "--ckpt", args.ckpt, "--device", args.device, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--variant", variant,
           "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    cmd += ([] if args.warmup is None else ["--warmup", str(args.warmup)]) + (extra or [])  # else the child's default
    label = f"[{impl}{' ' + variant if variant else ''} {dtype}]"
    print(f"{label} running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO), timeout=args.child_timeout)
    r = child_result(proc, label, RESULT_PREFIX)
    if r is None:
        return None
    print(f"{label} load {r['load_s']:.1f}s, TTFT {r['ttft_s']:.3f}s, decode {r['decode_tok_s']:.2f} tok/s, "
          f"peak RSS {r['peak_rss'] / GB:.2f} GB (weights {r['weight_bytes'] / GB:.2f} GB), "
          f"process {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="checkpoint directory (hub layout) to benchmark")
    ap.add_argument("--make", metavar="DIR", help="write a full-size random checkpoint to DIR first (if absent)")
    ap.add_argument("--ckpt-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype for --make")
    ap.add_argument("--dtypes", default=None, help="run dtypes, comma-separated (default: float32 on CPU, "
                    "bfloat16 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--impls", default=None, help="comma-separated; default ours,transformers "
                    "(+transformers-static on CUDA)")
    ap.add_argument("--ablate", action="store_true", help="add the ablation rows for ours")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over every row; the table shows medians "
                    "(times, speeds) and maxima (memory)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up generations before timing "
                    "(default 0 on CPU; on CUDA 1, 2 for the compiled implementations)")
    ap.add_argument("--batch-sizes", default=None, help="batch-captioning throughput at these batch sizes x 32 new "
                    "tokens, in this order (default 64,32,8,1 on CUDA, none on CPU); transformers-static runs the "
                    "first only (it compiles per shape)")
    ap.add_argument("--child-timeout", type=float, default=1800)
    # child-only flags
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--all-logits", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--aten-linear", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unpacked", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefill-dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = "" if args.device == "cpu" else "64,32,8,1"
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    if args.child:
        if args.warmup is None:
            args.warmup = default_warmup(args.impl, args.device)
        print(RESULT_PREFIX + json.dumps(run_child(args)), flush=True)
        return
    if args.make:
        if not (Path(args.make) / "config.json").exists():
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_checkpoint.py"), args.make,
                            "--dtype", args.ckpt_dtype], check=True)
        args.ckpt = args.ckpt or args.make
    if not args.ckpt:
        ap.error("give --ckpt DIR or --make DIR")
    args.ckpt = str(Path(args.ckpt).resolve())
    cpu = args.device == "cpu"
    dtypes = (args.dtypes or ("float32" if cpu else "bfloat16")).split(",")
    impls = (args.impls or ("ours,transformers" if cpu else "ours,ours-compiled,transformers,transformers-static")
             ).split(",")
    import torch  # noqa: F811 — the parent imports torch only for the version line and the yardsticks

    print(f"{args.ckpt}; device {args.device}; torch {torch.__version__}; {args.threads} threads; "
          f"{args.new_tokens} new tokens, greedy, EOS ignored; prompt: 1 image + {PROMPT!r}", file=sys.stderr)
    plan = []  # (impl, dtype, variant, extra flags), in table order
    for dtype in dtypes:
        plan += [(impl, dtype, "", []) for impl in impls]
        if args.ablate:
            for variant, extra in ABLATIONS.items():
                if "prefill" in variant and dtype == "float32":
                    continue  # float32 weights always prefill in float32
                if "linear" in variant and (dtype != "float32" or not cpu):
                    continue  # the oneDNN routing is for CPU float32 only
                if "packed" in variant and (dtype != "bfloat16" or not cpu):
                    continue  # packing is for CPU bf16 only
                plan.append(("ours", dtype, variant, extra))
    runs: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
    for _ in range(args.repeat):  # whole rounds, so slow drifts of a shared machine hit every row alike
        for i, (impl, dtype, variant, extra) in enumerate(plan):
            r = measure(args, impl, dtype, variant, extra)
            if r:
                runs[i].append(r)
    results = [median_row(rs, ("load_s", "ttft_s", "decode_tok_s")) for rs in runs.values() if rs]
    if not results:
        sys.exit("every run failed; see above")
    import torch

    torch.set_num_threads(args.threads)
    # The machine's yardsticks, measured after the children so that they never share the machine with a run.
    ceilings, micro, yardsticks = {}, [], []
    if cpu:
        read = read_bandwidth()
        yardsticks.append(f"DRAM read (sum over 2 GB) {read / GB:.1f} GB/s")
    for dtype in dtypes:
        if cpu:
            ceilings[dtype] = read
            yardsticks.append(f"{dtype} matrix-vector product {gemv_bandwidth(args.device, dtype) / GB:.1f} GB/s")
        micro += projection_micro(args.device, dtype)
    if not cpu:
        from_child = results[0].get("copy_bw")
        ceilings = dict.fromkeys(dtypes, from_child)
    print(f"\n{args.device}, {args.threads} threads, prompt {results[0]['prompt_len']} tokens (256 image + text), "
          f"{args.new_tokens} new tokens, greedy, batch 1; median of {args.repeat} run(s) per row\n")
    print(format_table(results, ceilings))
    if yardsticks:
        print(f"\nCeiling: {'; '.join(yardsticks)} (bytes of weights). % of decode ceiling = decoder + LM-head "
              "bytes per token x tokens/s / DRAM read bandwidth.")
    print("\n" + projection_table(micro))


if __name__ == "__main__":
    main()
