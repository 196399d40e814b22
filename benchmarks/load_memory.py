"""Measure load time and peak host memory of loading a hub-layout PaliGemma checkpoint on CPU.

    python benchmarks/load_memory.py CKPT_DIR [--dtypes float32,bfloat16] [--with-transformers]

For each dtype, a FRESH Python subprocess (so every peak is its own) imports the loader, then times
`utils.load_hf_model(CKPT_DIR, "cpu", dtype)` (which also loads the tokenizer; transformers itself is imported
before the clock starts, in both children) and records:

- peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of that child (exact high-water mark; the parent imports
  nothing heavy, so what a fork inherits is negligible), cross-checked against /proc/self/status VmHWM;
- RSS before the load (interpreter + torch + libraries) and after it (psutil);
- then every weight page is touched (one byte read per 4 KiB) and RSS is read again: a loader may hand back
  tensors that are still lazy views of the mmap'd files (safetensors >= 0.8 `get_tensor` is zero-copy), whose
  pages only count once read. "peak RSS" is ru_maxrss at the end, i.e. over load + touch; "peak in load" is
  ru_maxrss right after the load call;
- peak anonymous and peak file-backed RSS (RssAnon / RssFile sampled every 10 ms by a thread): file-backed pages
  are mmap'd checkpoint pages that count in RSS while mapped;
- weight bytes: sum of numel * itemsize over the model's state_dict in that dtype (tensors sharing storage, such as
  transformers' tied lm_head, counted once).

With --with-transformers, `transformers.PaliGemmaForConditionalGeneration.from_pretrained(CKPT_DIR, dtype=...)` is
measured the same way, each in its own subprocess, and the table gets ours/transformers ratios. Children run one at
a time. Load times depend on how much of the checkpoint is in the page cache: before each child the shards are read
once (so every load starts from a warm cache, as far as RAM allows; --no-warm skips this). Nothing is dropped.

The markdown table goes to stdout; progress and per-run diagnostics go to stderr. Make a checkpoint with
`python benchmarks/make_checkpoint.py OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "LOAD_MEMORY_RESULT "
GB = 1e9


# ---------------------------------------------------------------------------------------------------------------
# child: one load, in its own process
# ---------------------------------------------------------------------------------------------------------------

def _proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("Vm", "Rss")):
                key, value = line.split(":", 1)
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    return out


class _PeakSampler(threading.Thread):
    """Samples RssAnon / RssFile every `interval` s; keeps their maxima (the exact peak is ru_maxrss/VmHWM)."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for k, v in _proc_status().items():
            if k.startswith("Rss"):
                self.peak[k] = max(self.peak.get(k, 0), v)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak


def _weight_bytes(state_dict: dict) -> int:
    """Bytes of the state_dict's tensors, each distinct storage counted once (tied weights share one)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in state_dict.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _touch(state_dict: dict) -> int:
    """Read one byte per 4 KiB page of every distinct tensor, so lazily mapped weights become resident."""
    import torch

    seen: set[int] = set()
    acc = 0
    for t in state_dict.values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.is_contiguous():
            acc += int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum())
        else:
            acc += int(t.detach().float().sum().isfinite())
    return acc


def run_child(impl: str, dtype_name: str, ckpt: str) -> dict:
    """Load once and return the measurements (called in a fresh process)."""
    import resource

    import psutil
    import torch
    import transformers  # imported up front in both children, so neither load time includes it

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if impl == "ours":
        sys.path.insert(0, str(REPO))
        import utils

        dtype = utils.DTYPES[dtype_name]
    else:
        dtype = getattr(torch, dtype_name)
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if impl == "ours":
        model, _tok = utils.load_hf_model(ckpt, "cpu", dtype)
    else:
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)
    load_s = time.perf_counter() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    after_load = _proc_status()
    rss_after = proc.memory_info().rss
    sd = model.state_dict()
    t0 = time.perf_counter()
    _touch(sd)  # tensors may still be lazy views of the mmap'd files: read one byte of every page
    touch_s = time.perf_counter() - t0
    peaks = sampler.stop()
    rss_touched = proc.memory_info().rss
    status = _proc_status()
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    result = {
        "impl": impl, "dtype": dtype_name, "load_s": load_s, "touch_s": touch_s,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vm_hwm": status.get("VmHWM"),
        "peak_load": peak_load, "rss_before": rss_before, "rss_after": rss_after,
        "anon_after": after_load.get("RssAnon"), "file_after": after_load.get("RssFile"),
        "rss_touched": rss_touched, "anon_touched": status.get("RssAnon"), "file_touched": status.get("RssFile"),
        "peak_anon": peaks.get("RssAnon"), "peak_file": peaks.get("RssFile"),
        "weight_bytes": _weight_bytes(sd), "n_tensors": len(sd), "tensor_dtypes": dtypes,
        "meta_tensors": sum(t.is_meta for t in sd.values()),
    }
    if impl == "ours":  # part of load_s: load_hf_model also reads the tokenizer
        t0 = time.perf_counter()
        utils.load_tokenizer(ckpt, model.config)
        result["tokenizer_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------------------------
# parent: spawn children, print the table
# ---------------------------------------------------------------------------------------------------------------

def measure(impl: str, dtype: str, ckpt: str) -> dict:
    """Run one load in a fresh subprocess; its stderr passes through, its result comes back as JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, dtype, ckpt]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout)
        raise RuntimeError(f"{impl}/{dtype} child failed with exit code {proc.returncode}")
    res = json.loads(lines[-1][len(RESULT_PREFIX):])
    res["wall_s"] = wall
    return res


def warm_cache(ckpt: str) -> float:
    """Read every shard once so it sits in the page cache; returns the seconds it took (not counted in RSS)."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for path in sorted(Path(ckpt).glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GB:.2f}"


def format_table(results: list[dict]) -> str:
    """A markdown table, one row per (impl, dtype); ours rows get ours/transformers ratios when available."""
    hf = {r["dtype"]: r for r in results if r["impl"] == "transformers"}
    head = ["impl", "dtype", "load s", "peak RSS GB", "weight GB", "peak/weights", "load s ours/HF",
            "peak RSS ours/HF", "RSS before GB", "peak in load GB", "RSS after load GB", "RSS after touch GB",
            "peak anon GB", "peak file GB", "touch s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        w = r["weight_bytes"]
        ref = hf.get(r["dtype"]) if r["impl"] == "ours" else None
        cells = [
            r["impl"], r["dtype"], f"{r['load_s']:.1f}", _gb(r["ru_maxrss"]), _gb(w), f"{r['ru_maxrss'] / w:.2f}",
            f"{r['load_s'] / ref['load_s']:.2f}" if ref else "",
            f"{r['ru_maxrss'] / ref['ru_maxrss']:.2f}" if ref else "",
            _gb(r["rss_before"]), _gb(r["peak_load"]), _gb(r["rss_after"]), _gb(r["rss_touched"]),
            _gb(r["peak_anon"]), _gb(r["peak_file"]), f"{r['touch_s']:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        impl, dtype, ckpt = argv[1:4]
        print(RESULT_PREFIX + json.dumps(run_child(impl, dtype, ckpt)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir", type=Path)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--with-transformers", action="store_true",
                    help="also measure transformers' PaliGemmaForConditionalGeneration.from_pretrained")
    ap.add_argument("--no-warm", action="store_true", help="do not read the shards into the page cache first")
    args = ap.parse_args(argv)
    ckpt = str(args.ckpt_dir.resolve())
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"unknown dtype {d!r}")
    impls = ["ours"] + (["transformers"] if args.with_transformers else [])
    shard_bytes = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
    print(f"checkpoint {ckpt}: {shard_bytes / GB:.2f} GB of safetensors; host RAM "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB, {os.cpu_count()} CPUs",
          file=sys.stderr, flush=True)
    results = []
    for dtype in dtypes:
        for impl in impls:
            warm = "" if args.no_warm else f" (page cache warmed in {warm_cache(ckpt):.1f}s)"
            print(f"[{impl} {dtype}] loading in a fresh process{warm} ...", file=sys.stderr, flush=True)
            r = measure(impl, dtype, ckpt)
            results.append(r)
            extra = f", tokenizer {r['tokenizer_s']:.1f}s of it" if "tokenizer_s" in r else ""
            print(f"[{impl} {dtype}] load {r['load_s']:.1f}s{extra}, touch {r['touch_s']:.1f}s (process wall "
                  f"{r['wall_s']:.1f}s); peak: ru_maxrss {_gb(r['ru_maxrss'])} GB, VmHWM {_gb(r['vm_hwm'])} GB, "
                  f"during load {_gb(r['peak_load'])} GB; RSS before {_gb(r['rss_before'])}, after load "
                  f"{_gb(r['rss_after'])} (anon {_gb(r['anon_after'])}, file {_gb(r['file_after'])}), after touch "
                  f"{_gb(r['rss_touched'])} (anon {_gb(r['anon_touched'])}, file {_gb(r['file_touched'])}); "
                  f"weights {_gb(r['weight_bytes'])} GB in {r['n_tensors']} tensors {r['tensor_dtypes']}"
                  f"{', ' + str(r['meta_tensors']) + ' on meta!' if r['meta_tensors'] else ''}",
                  file=sys.stderr, flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
