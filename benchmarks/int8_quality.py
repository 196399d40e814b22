"""How far int8 (and bf16) logits move from float32 on a full-size checkpoint: top-1 agreement and relative error.

    python benchmarks/int8_quality.py --ckpt /tmp/pg-3b-224-f32 --steps 64

For each prompt (one noise image + a task prompt), the int8 model generates --steps greedy tokens (64 float32
decode steps would read 750 GB); then every setting (int8 with bf16 float parts, bf16, float32) runs one
teacher-forced forward over the prompt and those tokens (in the arithmetic dtype its prefill uses on this CPU,
generation.auto_prefill_dtype), so every setting is scored on the same --steps positions against float32: the
share of steps whose argmax equals float32's (top-1 agreement), the relative error of the logits (Frobenius
norm of the difference over float32's), and the number of leading steps whose argmax agree. One model is in
memory at a time (float32 needs ~12 GB). Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generation import auto_prefill_dtype, generate_ids, make_processor  # noqa: E402
from utils import load_hf_model  # noqa: E402

PROMPTS = ("caption en", "answer en what is in the image?", "detect cat ; dog", "ocr")
# Loaded one at a time in this order (float32 needs ~12 GB); int8 first generates the tokens.
SETTINGS = {"int8": dict(quantize="int8"), "bfloat16": dict(dtype="bfloat16"), "float32": dict(dtype="float32")}


def _inputs(processor, prompt: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((240, 320, 3)) * 255).astype("uint8"))
    return processor(text=[prompt], images=[image])


@torch.inference_mode()
def _step_logits(model, inputs: dict, new_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (steps, V) predicting new_ids[i] at step i, in float32."""
    T = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], new_ids[None]], 1)
    out = model(ids, inputs["pixel_values"], prefix_len=T, compute_dtype=auto_prefill_dtype(model))["logits"]
    out = out[0, T - 1:T - 1 + new_ids.numel()]
    return out.float()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    args = ap.parse_args(argv)
    cases, logits = [], {}
    for name, kwargs in SETTINGS.items():  # int8 first: it generates the tokens every setting is scored on
        model, tok = load_hf_model(args.ckpt, "cpu", progress=False, **kwargs)
        if not cases:
            processor = make_processor(model, tok)
            for i, prompt in enumerate(PROMPTS[:args.prompts]):
                inputs = _inputs(processor, prompt, i)
                ids = generate_ids(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=args.steps,
                                   eos_token_ids=[])[0]
                cases.append((prompt, inputs, ids))
        logits[name] = [_step_logits(model, inputs, ids) for _prompt, inputs, ids in cases]
        print(f"{name}: logits at {args.steps} steps of {len(cases)} prompts", file=sys.stderr, flush=True)
        del model
        gc.collect()
    print(f"\n{args.ckpt}: {args.steps} greedy int8 steps per prompt, every setting teacher-forced on them; "
          f"arithmetic as each setting's prefill on this CPU\n")
    print("| setting | prompt | top-1 agreement with float32 | logits rel. error | leading steps agreeing |")
    print("|---|---|---|---|---|")
    for name in SETTINGS:
        if name == "float32":
            continue
        for (prompt, *_), got, want in zip(cases, logits[name], logits["float32"], strict=True):
            agree = got.argmax(-1) == want.argmax(-1)
            lead = int(agree.long().cumprod(0).sum())
            err = ((got - want).norm() / want.norm()).item()
            print(f"| {name} | `{prompt}` | {agree.float().mean().item():.3f} | {err:.4f} | {lead}/{args.steps} |")


if __name__ == "__main__":
    main()
