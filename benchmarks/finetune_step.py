"""One fine-tuning step on a full-size checkpoint, this project against transformers (+ peft), each in its own
process, one after the other in the same run: step time and peak RSS, side by side, with the ratios.

    python benchmarks/make_checkpoint.py /tmp/pg-3b-224-f32 --name paligemma-3b-224 --dtype float32
    python benchmarks/finetune_step.py --ckpt /tmp/pg-3b-224-f32 --presets attn,lora

Method: the same batch for both sides (batch 1: one 224-px image, "caption en", an 11-token suffix + EOS, built
by our processor, whose ids equal transformers' — tests/test_suffix.py). A step = forward with labels, backward,
AdamW step, zero_grad. Preset attn: only the decoder's q/k/v/o projections train (transformers: the same
parameters by name); lora: peft's LoraConfig r=8 on the decoder's q/k/v/o/gate/up/down (training.lora_config,
the same object on both sides). Weights float32; bf16 autocast on both sides where the CPU computes bf16
natively (AVX512-BF16/AMX), else float32. Ours runs finetune.py's path (training.training_loss: the LM head on
the labelled positions only); transformers runs model(**batch, labels=...).loss, its own training path. The first
step is a warm-up (allocator, oneDNN primitive caches); the median of --steps timed steps is reported. Peak RSS:
the process's ru_maxrss, which includes loading the weights (both load float32 shards as float32). No threshold
is asserted: read the ratios. Prints a markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/ is on sys.path when a script in it runs

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SUFFIX = "a cow standing on the sandy beach next to the sea"


def _batch(ckpt: str):
    import torch
    from PIL import Image

    from generation import make_processor
    from utils import load_config, load_tokenizer

    cfg = load_config(ckpt)
    tok = load_tokenizer(ckpt, cfg)

    class _Shape:  # make_processor needs only the model's config
        config = cfg

    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    return make_processor(_Shape, tok)(text=["caption en"], images=[image], suffix=[SUFFIX])


def worker(impl: str, preset: str, ckpt: str, steps: int) -> dict:
    """Load, warm up, time `steps` steps; return the measurements."""
    import torch

    import ops
    from training import apply_preset, lora_config, training_loss

    bf16 = ops.cpu_has_bf16_arithmetic()
    batch = _batch(ckpt)
    t0 = time.perf_counter()
    if impl == "ours":
        from utils import load_hf_model

        model, _ = load_hf_model(ckpt, "cpu", torch.float32, progress=False)
        model = apply_preset(model, preset)

        def loss_fn():
            return training_loss(model, batch)
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        if preset == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config())
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(".language_model.layers." in name and ".self_attn." in name)

        def loss_fn():
            return model(**batch).loss
    load_s = time.perf_counter() - t0
    print(f"  {impl} {preset}: loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"  {impl} {preset}: step {len(times)} {times[-1]:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr,
              flush=True)
    return {"load_s": load_s, "step_s": statistics.median(times[1:]), "steps": times[1:], "first_loss": losses[0],
            "trainable": sum(p.numel() for p in params), "bf16": bf16,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "threads": torch.get_num_threads()}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="full-size checkpoint directory (make_checkpoint.py)")
    parser.add_argument("--presets", default="attn,lora", help="comma-separated: attn, lora")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.ckpt, args.steps)))
        return
    import torch

    rows = []
    for preset in args.presets.split(","):
        result = {}
        for impl in ("ours", "transformers"):
            print(f"{impl}, preset {preset}: loading and stepping in a fresh process", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--ckpt", args.ckpt, "--steps", str(args.steps),
                                  "--worker", impl, preset], stdout=subprocess.PIPE, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{impl} {preset} failed (exit {out.returncode})")
            result[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((preset, result))
    ours0 = rows[0][1]["ours"]
    print(f"CPU: {cpu_model()}, {ours0['threads']} threads; torch {torch.__version__}; "
          f"{'bf16 autocast' if ours0['bf16'] else 'float32 (no native bf16 on this CPU)'}; batch 1; "
          f"median of {args.steps} steps after a warm-up\n")
    print("| preset | trainable params | step s, ours | step s, transformers | ours / transformers | peak RSS GB, ours "
          "| peak RSS GB, transformers | ours / transformers | first loss ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, r in rows:
        o, t = r["ours"], r["transformers"]
        print(f"| {preset} | {o['trainable']:,} | {o['step_s']:.2f} | {t['step_s']:.2f} | "
              f"{o['step_s'] / t['step_s']:.2f} | {o['peak_rss_gb']:.2f} | {t['peak_rss_gb']:.2f} | "
              f"{o['peak_rss_gb'] / t['peak_rss_gb']:.2f} | {o['first_loss']:.4f} / {t['first_loss']:.4f} |")


if __name__ == "__main__":
    main()
