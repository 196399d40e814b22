"""Where the CUDA time of PaliGemma-3B goes: compiled-decode variants and a kernel profile, one process each.

    python benchmarks/gpu_decode_ablation.py [--variants base,cdt,fused,cdt+fused] [--profile]

Random bf16 weights with the real paligemma-3b-224 shapes, drawn on the GPU (no checkpoint to write: speed does
not depend on the values). Per variant, a fresh process: warm-up (compiles), then TTFT of one image + a 4-token
prompt (260 tokens), and decode tokens/s at batch 1 over --new-tokens with the decode step compiled
(generate_ids(compile=True)). Variants:
- base: as the library runs today;
- cdt: torch._inductor.config.coordinate_descent_tuning (inductor tunes its generated kernels' launch
  parameters);
- fused: q/k/v and gate/up each as one matmul over concatenated weights (fewer, larger matrix-vector products);
- cdt+fused: both;
- eager-prefill: the prefill left eager (compile=True compiles it on CUDA: generation.prefill_fn);
- eager: nothing compiled (generate_ids(compile=False));
- sdpa-decode: decode attention (one query row) through SDPA, as before the explicit matmul/softmax path
  (modeling_gemma.grouped_attention), e.g. `eager+sdpa-decode`.
--batch B runs B images (the same prompt per row): TTFT is then the whole batch's prefill, decode tokens/s counts
steps (each gives B tokens). --profile adds the 15 most expensive CUDA kernels of 16 decode steps (compiled unless
the variant is eager) and of one eager prefill, and each one's GPU-busy time against its wall time (far longer
than its kernels: launch-bound).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PREFIX = "ABLATION "


def build(device: str, **overrides):
    import torch

    from modeling_gemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig.from_name("paligemma-3b-224", **overrides)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases and norms: SigLIP LayerNorm weights 1, Gemma RMSNorm weights 0 (identity)
                p.fill_(1.0 if "vision" in name and "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02)
    return model


def fuse_projections(model) -> None:
    """q/k/v -> one matmul, gate/up -> one matmul, by patching forward of each layer's modules (experiment only)."""
    import types

    import torch
    import torch.nn.functional as F

    import modeling_gemma as mg
    import ops

    for layer in model.language_model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        att.qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach()
        mlp.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()

        def att_forward(self, x, cos_sin, mask, input_pos, kv_cache):
            B, T, _ = x.shape
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv).split([nq, nkv, nkv], dim=-1)
            q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            cos, sin = cos_sin
            q = q * cos + mg.rotate_half(q) * sin
            k = k * cos + mg.rotate_half(k) * sin
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, input_pos, k, v)
            y = mg.grouped_attention(q, k, v, mask, self.scale, self.softcap)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, nq))

        def mlp_forward(self, x):
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(ops.gelu_tanh(gate) * up)

        att.forward = types.MethodType(att_forward, att)
        mlp.forward = types.MethodType(mlp_forward, mlp)


def sdpa_decode_attention() -> None:
    """Variant sdpa-decode: grouped_attention through SDPA for every call, one query row included."""
    import torch.nn.functional as F

    import modeling_gemma as mg

    def attention(q, k, v, mask, scale, softcap):
        B, H, T, hd = q.shape
        n_kv, S = k.shape[1], k.shape[2]
        rep = H // n_kv
        mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        y = F.scaled_dot_product_attention(q.reshape(B, n_kv, rep * T, hd), k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, H, T, hd)

    mg.grouped_attention = attention  # looked up at call time by GemmaAttention


def child(args) -> dict:
    import torch

    from generation import generate_ids

    if "cdt" in args.variant:
        torch._inductor.config.coordinate_descent_tuning = True
    device = torch.device(args.device)
    model = build(args.device)
    if "fused" in args.variant:
        fuse_projections(model)
    if "sdpa-decode" in args.variant:
        sdpa_decode_attention()
    if "eager-prefill" in args.variant:  # compile=True without the compiled prefill (the library's default before)
        import generation

        generation.prefill_fn = lambda model, compile: generation.prefill
    compile = "eager" not in args.variant.split("+")
    B = args.batch
    ids = torch.tensor([[model.config.image_token_index] * 256 + [2, 580, 649, 108]] * B, device=device)
    pixels = torch.randn(B, 3, 224, 224, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(2 if compile else 1):  # compile, then record the CUDA graph
        generate_ids(model, ids, pixels, max_new_tokens=args.new_tokens, eos_token_ids=[], compile=compile)
    warm_s = time.perf_counter() - t0
    firsts = []

    def on_token(_t):
        if not firsts:
            sync()
            firsts.append(time.perf_counter())

    res = {"variant": args.variant, "warmup_s": warm_s}
    ttft, decode, total = [], [], []
    for _ in range(3):
        firsts.clear()
        sync()
        t0 = time.perf_counter()
        generate_ids(model, ids, pixels, max_new_tokens=args.new_tokens, eos_token_ids=[], compile=compile,
                     on_token=on_token)
        sync()
        t1 = time.perf_counter()
        ttft.append(firsts[0] - t0)
        decode.append((args.new_tokens - 1) / (t1 - firsts[0]))
        total.append(t1 - t0)
    res.update(ttft_ms=1e3 * min(ttft), decode_tok_s=max(decode), images_s=B / min(total))
    if args.profile and device.type == "cuda":
        try:
            res["profile"] = profile(model, ids, pixels, compile)
        except Exception as e:  # noqa: BLE001 — the timings above still count
            res["profile"] = {"error": repr(e)}
    return res


def profile(model, ids, pixels, compile: bool):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from generation import generate_ids, prefill

    out = {}
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        generate_ids(model, ids, pixels, max_new_tokens=17, eos_token_ids=[], compile=compile)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    key = "device_time_total"
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e3
    out["generate"] = f"prefill + 16 steps: kernels {busy:.2f} ms busy in {1e3 * wall:.2f} ms wall (profiled)"
    out["decode_kernels"] = p.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + 1)
    pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # (B, T)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill(model, ids, pixels, mask, cache, pos)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            prefill(model, ids, pixels, mask, cache, pos)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = sum(e.self_device_time_total for e in p.key_averages()) / 1e3  # ms (profiler overhead inflates wall)
    out["prefill"] = f"kernels {busy:.2f} ms busy in {1e3 * wall:.2f} ms wall (profiled)"
    out["prefill_kernels"] = p.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,eager-prefill,fused,cdt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="kernel tables for the first variant")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per variant")
    ap.add_argument("--batch", type=int, default=1, help="images per generation (rows)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(PREFIX + json.dumps(child(args)), flush=True)
        return
    for i, variant in enumerate(args.variants.split(",")):
        cmd = [sys.executable, __file__, "--child", "--variant", variant, "--new-tokens", str(args.new_tokens),
               "--batch", str(args.batch), "--device", args.device]
        if args.profile and i == 0:
            cmd.append("--profile")
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{variant}: out of time ({args.timeout:.0f} s)", flush=True)
            continue
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith(PREFIX)]
        if not lines:
            print(f"{variant}: FAILED\n{run.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1][len(PREFIX):])
        print(f"{variant}: batch {args.batch}: TTFT {r['ttft_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} steps/s, "
              f"{r['images_s']:.1f} images/s over {args.new_tokens} tokens (warm-up {r['warmup_s']:.0f} s)", flush=True)
        for key, text in r.get("profile", {}).items():
            print(f"--- {key}\n{text}", flush=True)


if __name__ == "__main__":
    main()
