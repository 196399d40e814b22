"""The CUDA path proven in one command: the `cuda` tests, then speed vs transformers on a full-size checkpoint.

    python benchmarks/gpu_check.py OUT_DIR                      # on a GPU machine: ~8 minutes in all

For a GPU machine that is lent for minutes, with its own torch and transformers, no pip and no network. Stages,
each with its own time budget (seconds, `--budgets` overrides), in this order:

1. env (versions of Python, torch, transformers, CUDA; the GPU; fire, which the CLI test needs);
2. tests: `python -m pytest -q -m cuda` (tests/test_cuda.py: parity with transformers, compiled decode,
   batching, the CLI on --device cuda), run while 3. writes the checkpoint;
3. checkpoint: a full-size random PaliGemma-3B-224 in bf16 via benchmarks/make_checkpoint.py (skipped when
   the directory already holds one);
4. one stage per implementation, each a fresh process (benchmarks/speed.py's child): ours eager, transformers
   eager, ours compiled (prefill and decode step as CUDA graphs), transformers static cache + compile. Each
   loads the checkpoint, warms up (twice for the compiled ones), then measures TTFT (one image + "caption en"),
   decode tokens/s at batch 1 over --new-tokens, the device copy bandwidth (the decode ceiling), and images/s
   for batch captioning at --batch-sizes x 32 new tokens (largest first; the compiled ones the largest only,
   they compile per shape).

OUT_DIR receives, rewritten after every stage (a run killed at any point still leaves what it measured):
`results.json` (every stage's record), `results.md` (the tables), `tests.log`, `stages.log` (the children's
stderr). A stage that runs out of its budget is killed and marked so; the next one starts. The exit code is 0
when every stage finished and the tests passed, else 1.

On a CPU the same code runs with a tiny checkpoint (`--device cpu --ckpt DIR --new-tokens 4 --batch-sizes 2,1`):
tests/test_gpu_check.py does that, so the GPU minutes go to measuring, not debugging.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import speed  # noqa: E402 — its child runs each stage; RESULT_PREFIX marks the child's result lines

IMPLS = ["ours", "transformers", "ours-compiled", "transformers-static"]
BUDGETS = {"tests": 150, "checkpoint": 120, "ours": 50, "transformers": 50, "ours-compiled": 180,
           "transformers-static": 110}


class Report:
    """The results so far, written to OUT_DIR after every change (atomically: a temporary file, then rename)."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out, self.args = out, args
        self.data: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "env": {},
                           "stages": {}, "runs": []}
        self.started = time.perf_counter()

    def stage(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        _atomic_write(self.out / "results.json", json.dumps(self.data, indent=1))
        _atomic_write(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        env, args = self.data["env"], self.args
        lines = [f"# GPU check: {env.get('device_name', args.device)}", "",
                 "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env.items()]
        lines += ["", "| stage | status | seconds | detail |", "|---|---|---|---|"]
        for name, st in self.data["stages"].items():
            lines.append(f"| {name} | {st.get('status', '')} | {st.get('seconds', '')} | {st.get('detail', '')} |")
        runs = self.data["runs"]
        if runs:
            ceiling = next((r["copy_bw"] for r in runs if r.get("copy_bw")), None)
            lines += ["", f"Checkpoint: {args.ckpt} (bf16); prompt {runs[0]['prompt_len']} tokens (256 image + "
                      f"text); batch 1 decode over {args.new_tokens} new tokens, greedy, EOS ignored; images/s "
                      f"at B x 32 new tokens. Decode ceiling: device copy bandwidth "
                      f"{(ceiling or 0) / 1e9:.0f} GB/s (read + write), measured in the same run.", ""]
            lines.append(run_table(runs, ceiling))
        return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_table(runs: list[dict], ceiling: float | None) -> str:
    """One row per implementation: TTFT, decode, % of the copy-bandwidth ceiling, images/s, tokens vs transformers."""
    by_impl = {r["impl"]: r for r in runs}
    theirs = by_impl.get("transformers") or by_impl.get("transformers-static")
    static = by_impl.get("transformers-static")
    sizes = sorted({int(b) for r in runs for b in r.get("images_s", {})})
    head = ["impl", "load s", "TTFT ms", "decode tok/s", "% of ceiling", "decode vs HF static",
            *[f"img/s B={b}" for b in sizes], "peak GB", "tokens equal to HF eager"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        pct = f"{100 * r['decode_bytes'] * r['decode_tok_s'] / ceiling:.0f}%" if ceiling else ""
        vs = f"{r['decode_tok_s'] / static['decode_tok_s']:.2f}x" if static and r is not static else ""
        imgs = [f"{r['images_s'][str(b)]:.1f}" if str(b) in r.get("images_s", {}) else "" for b in sizes]
        same = "" if theirs is None or r is theirs else f"{agreement(r['ids'], theirs['ids'])}/{len(theirs['ids'])}"
        peak = f"{r['peak_cuda'] / 1e9:.1f}" if "peak_cuda" in r else f"{r['peak_rss'] / 1e9:.1f} (host)"
        rows.append("| " + " | ".join([r["impl"], f"{r['load_s']:.1f}", f"{r['ttft_s'] * 1e3:.1f}",
                                       f"{r['decode_tok_s']:.1f}", pct, vs, *imgs, peak, same]) + " |")
    return "\n".join(rows)


def agreement(a: list[int], b: list[int]) -> int:
    """Leading greedy tokens two runs share (random weights have near-ties; bf16 rounding breaks them apart)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def environment(device: str) -> dict:
    """What the machine runs: read from the installed packages, never assumed."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "-"}
    for name in ("transformers", "fire", "safetensors"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "missing"
        except AttributeError:
            env[name] = "present"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device_name=props.name, device_memory_gb=round(props.total_memory / 1e9, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    return env


def run_with_budget(cmd: list[str], budget: float, log, on_line=None) -> tuple[str, float]:
    """Run cmd, stderr to `log`; stdout lines to on_line. Kill it (and its children) at `budget` seconds.
    Returns (status, seconds): "ok", "failed (exit N)" or "out of time"."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO),
                            start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    status = None
    while status is None:
        left = budget - (time.perf_counter() - t0)
        if left <= 0:
            _kill(proc)
            status = "out of time"
            break
        if sel.select(timeout=min(left, 1.0)):
            line = proc.stdout.readline()
            if line:
                if on_line:
                    on_line(line)
                continue
            proc.wait()
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        elif proc.poll() is not None:
            for line in proc.stdout:
                if on_line:
                    on_line(line)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    sel.close()
    return status, round(time.perf_counter() - t0, 1)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: its helpers (compile workers) go too
    except ProcessLookupError:
        pass
    proc.wait()


def cuda_test_files() -> list[str]:
    """The test modules that hold `cuda`-marked tests: only these are collected, since the GPU machine may lack
    packages that other modules import (pycocotools, openai) and a collection error fails the stage."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def impl_cmd(args, impl: str) -> list[str]:
    sizes = args.batch_sizes
    return [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--child", "--impl", impl, "--dtype", "bfloat16",
            "--ckpt", args.ckpt, "--device", args.device, "--new-tokens", str(args.new_tokens),
            "--threads", str(args.threads), "--batch-sizes", sizes,
            "--warmup", str(speed.default_warmup(impl, "cuda"))]  # as on a GPU, also when the tests run it on a CPU


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory for results.json, results.md and the logs (created)")
    ap.add_argument("--ckpt", default="/tmp/pg-3b-224-bf16", help="checkpoint directory; written by the checkpoint "
                    "stage when it holds no config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", default="tests,checkpoint," + ",".join(IMPLS), help="comma-separated subset")
    ap.add_argument("--budgets", default="", help="overrides, e.g. tests=60,ours-compiled=200 (seconds)")
    ap.add_argument("--total", type=float, default=480, help="seconds for everything; a stage gets at most what is "
                    "left")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="64,32,8,1", help="images/s at these batch sizes, in this order")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    ap.add_argument("--pytest-args", default="", help="extra arguments for the tests stage, split as a shell would")
    args = ap.parse_args(argv)
    budgets = dict(BUDGETS)
    for item in filter(None, args.budgets.split(",")):
        name, _, value = item.partition("=")
        budgets[name] = float(value)
    stages = args.stages.split(",")
    unknown = set(stages) - set(budgets)
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(budgets)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.ckpt = str(Path(args.ckpt).resolve())
    report = Report(out, args)
    deadline = time.perf_counter() + args.total
    report.data["env"] = environment(args.device)
    print(json.dumps(report.data["env"]), file=sys.stderr, flush=True)
    report.write()

    def left(name: str) -> float:
        return min(budgets[name], deadline - time.perf_counter())

    with open(out / "stages.log", "a") as log, open(out / "tests.log", "w") as tests_log:
        tests = None
        if "tests" in stages:  # started first, in parallel with the checkpoint (which needs no GPU)
            cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *cuda_test_files(),
                   *shlex.split(args.pytest_args)]
            env = dict(os.environ, PALIGEMMA_TEST_DEVICE=args.device)
            tests = (subprocess.Popen(cmd, stdout=tests_log, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
                                      env=env, start_new_session=True), time.perf_counter())
            report.stage("tests", status="running")
        if "checkpoint" in stages:
            if (Path(args.ckpt) / "config.json").exists():
                report.stage("checkpoint", status="present", seconds=0, detail=args.ckpt)
            else:
                cmd = [sys.executable, str(REPO / "benchmarks" / "make_checkpoint.py"), args.ckpt,
                       "--name", "paligemma-3b-224", "--dtype", "bfloat16"]
                status, secs = run_with_budget(cmd, left("checkpoint"), log)
                report.stage("checkpoint", status=status, seconds=secs, detail=args.ckpt)
        if tests is not None:
            proc, t0 = tests
            try:
                proc.wait(timeout=max(0.0, min(budgets["tests"] - (time.perf_counter() - t0),
                                               deadline - time.perf_counter())))
                status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                _kill(proc)
                status = "out of time"
            tests_log.flush()
            summary = [ln for ln in (out / "tests.log").read_text().splitlines() if ln.strip()][-1:]
            report.stage("tests", status=status, seconds=round(time.perf_counter() - t0, 1),
                         detail=summary[0][:200] if summary else "")
        for impl in [s for s in IMPLS if s in stages]:
            if not (Path(args.ckpt) / "config.json").exists():
                report.stage(impl, status="skipped: no checkpoint")
                continue
            if deadline - time.perf_counter() < 5:  # not even the imports would finish
                report.stage(impl, status="skipped: out of total time")
                continue
            log.write(f"\n===== {impl} =====\n")
            log.flush()
            found: list[dict] = []

            def on_line(line: str, found=found) -> None:
                if line.startswith(speed.RESULT_PREFIX):  # partial results: keep the latest
                    found[:] = [json.loads(line[len(speed.RESULT_PREFIX):])]

            status, secs = run_with_budget(impl_cmd(args, impl), left(impl), log, on_line)
            if found:
                report.data["runs"] = [r for r in report.data["runs"] if r["impl"] != impl] + found
            r = found[0] if found else None
            detail = (f"TTFT {r['ttft_s'] * 1e3:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s, "
                      f"B sizes done {sorted(map(int, r['images_s']))}" if r else "no measurement")
            report.stage(impl, status=status, seconds=secs, detail=detail)
            print(f"[{impl}] {status} in {secs}s: {detail}", file=sys.stderr, flush=True)
    report.write()
    print(report.markdown())
    ok = all(st.get("status") in ("ok", "passed", "present") for st in report.data["stages"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
