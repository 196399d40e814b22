"""CPU kernel plumbing shared by both model files: the matmul route, dtype-following layers, bf16 weight packing.

Nothing here changes what a layer computes, only which kernel computes it and in which dtype:

- `linear`: F.linear, with float32 CPU matmuls routed through oneDNN instead of ATen's default (MKL). The switch
  is `ONEDNN_LINEAR`, read at call time through `onednn_enabled()` by the matmul route and by the packing
  decision alike; set `ops.ONEDNN_LINEAR = False` for ATen's kernels everywhere.
- `Linear`, `LayerNorm`, `Conv2d`: the nn layers, computing in the dtype of their input (`cast_like`), so bf16
  weights can run the prefill in float32 on CPUs without bf16 arithmetic while decode stays in bf16.
- `pack_linear_weights`: bf16 `Linear` weights repacked into oneDNN's blocked layout (same results bit for bit).
- `cpu_has_bf16_arithmetic`: the /proc/cpuinfo probe behind both CPU decisions (prefill dtype, packing).

Checked against: ATen's `torch.ops.mkldnn._linear_pointwise` / `_reorder_linear_weight` (the ops inductor's
CPU backend uses for the same purpose; tests/test_parity.py and tests/test_fast_path.py compare the results).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading

import torch
import torch.nn.functional as F
from torch import nn

# float32 x @ W.T on x86 CPUs through oneDNN instead of ATen's default (MKL sgemm/sgemv, whose matrix-vector
# product runs on one core). Same float32 arithmetic, another summation order: logits move within the parity
# tests' tolerance. bf16 matmuls already go through oneDNN in ATen. This is the off-switch: False -> ATen's
# kernels and no weight packing; read only through onednn_enabled(), at call time.
ONEDNN_LINEAR: bool = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and platform.machine().lower() in ("x86_64", "amd64")
)


def onednn_enabled() -> bool:
    """Whether float32 CPU matmuls take oneDNN and load_hf_model(pack=None) packs: the current `ONEDNN_LINEAR`."""
    return ONEDNN_LINEAR


@functools.cache  # read once per process: generate_ids asks on every call
def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm), read from Linux's
    /proc/cpuinfo; False elsewhere. Without it, oneDNN emulates bf16 matmuls several times slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed through oneDNN for float32 CPU inference (see ONEDNN_LINEAR) and for packed weights."""
    # Packed weights (pack_linear_weights) are in oneDNN's own layout: only oneDNN can read them. Otherwise the
    # op has no autograd formula, so gradients (fine-tuning) take F.linear; under torch.compile inductor picks
    # its own matmul kernels (its lowering of this op expects prepacked weights).
    if weight.is_mkldnn or (
            onednn_enabled() and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and not (x.requires_grad or weight.requires_grad) and weight.is_contiguous()
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The layers below compute in the dtype of their INPUT: a parameter of another dtype is cast for the call. With
# activations in the weights' dtype (the normal case) nothing changes. It lets bfloat16 weights run the prefill in
# float32 on CPUs without bfloat16 arithmetic (PaliGemmaForConditionalGeneration.forward's compute_dtype), where
# bf16 matmuls are several times slower than fp32 ones, while decode (memory-bound) stays in bf16.

_SCRATCH = threading.local()  # per thread: {(dtype, device): flat buffer} for weights cast to the input dtype


def cast_like(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """p in x's dtype. Large weights are cast into a reused per-thread buffer: a fresh float32 copy of a large
    weight per matmul would cost page faults on every allocation (the float32 prefill of bf16 weights casts
    nearly all of them). The result is only valid until the next cast, which is all a layer's single matmul needs."""
    if p is None or p.dtype == x.dtype:
        return p
    if p.is_mkldnn:  # a packed weight (pack_linear_weights) met activations of another dtype: unpack first
        p = p.to_dense()
    # Training (bf16 autocast hands bf16 activations to float32 weights): autograd keeps the cast weight for the
    # backward pass, so it must be a copy of its own, never the scratch buffer the next cast overwrites.
    if p.numel() < (1 << 20) or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and (p.requires_grad or x.requires_grad)):
        return p.to(x.dtype)
    return scratch(p.shape, x.dtype, p.device).copy_(p)


def scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` in this thread's reused buffer for (dtype, device), which grows to the
    largest request and is never freed. Valid until the next call for the same dtype and device: for a weight
    made for one matmul (cast_like, quantize.int8_linear's dequantized weight)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = shape.numel()
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


class Linear(nn.Linear):
    """nn.Linear computing in the input's dtype through `linear`; same parameters and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, cast_like(self.weight, x), cast_like(self.bias, x))


class Embedding(nn.Embedding):
    """nn.Embedding that draws no initial weights on the meta device; same parameters and state_dict keys."""

    def reset_parameters(self) -> None:
        # load_hf_model builds the model on "meta" and then assigns the checkpoint's tensors, so a meta draw is
        # wasted; worse, meta normal_ is one of torch's Python decompositions, whose first use imports ~800 modules
        # (torch._dynamo, sympy, ...): seconds of every cold start and ~80 MB of peak RSS (benchmarks/README.md).
        if self.weight.device.type != "meta":
            super().reset_parameters()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, cast_like(self.weight, x), cast_like(self.bias, x), self.eps)


class Conv2d(nn.Conv2d):
    """nn.Conv2d computing in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_like(self.weight, x), cast_like(self.bias, x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: SigLIP and Gemma were trained with it, not the exact erf form."""
    return F.gelu(x, approximate="tanh")


@functools.cache
def can_pack_bf16() -> bool:
    """Whether oneDNN can hold bf16 weights in its blocked layout on this CPU (on x86 it needs AVX-512 or
    AVX-NE-CONVERT; an AVX2-only CPU cannot), found by packing a tiny weight once."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# Packing costs ~5-7 s of load for PaliGemma-3B and saves ~0.02-0.07 s per decoded token at batch 1 (+12 %
# decode on a Sapphire Rapids, +50 % on a Zen 5; benchmarks/README.md): it pays back after ~100-250 tokens, so
# not for one caption (~20 tokens) but for a run of many answers. The CLI asks for packing (pack=None) from this
# many images on; a one-image run loads dense weights.
PACK_MIN_ANSWERS = 16


def packing_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """load_hf_model(pack=None): pack where it pays, i.e. bf16 weights on a CPU with bf16 arithmetic, oneDNN on."""
    return (onednn_enabled() and device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_bf16_arithmetic()
            and can_pack_bf16())


def pack_linear_weights(model: nn.Module) -> int:
    """Repack the bfloat16 CPU weights of every `Linear` into oneDNN's blocked layout for batch-1 inference;
    returns how many. Same results bit for bit; decode's matrix-vector products read the weights faster
    (benchmarks/README.md), and prefill GEMMs are no slower. The weights become opaque oneDNN tensors: fine for
    inference on this CPU, but not for saving, .to(device), data_ptr() or torch.compile — reload the checkpoint
    (load_hf_model(..., pack=False)) for a dense model. One weight is copied at a time. Raises RuntimeError
    where the CPU cannot (can_pack_bf16)."""
    if not can_pack_bf16():
        raise RuntimeError("this CPU cannot hold packed bf16 weights (oneDNN needs AVX-512 or AVX-NE-CONVERT); "
                           "load with pack=False")
    count = 0
    for module in model.modules():
        w = module.weight if isinstance(module, Linear) else None
        if w is not None and w.dtype == torch.bfloat16 and w.device.type == "cpu" and not w.is_mkldnn:
            module.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1), requires_grad=False)
            del w
            _release_freed_memory()  # after each weight, so the freed dense copies never pile up
            count += 1
    return count


def _release_freed_memory() -> None:
    """Hand the heap pages freed by the dense weights back to the OS (glibc keeps them otherwise, which shows as
    resident memory never given back). A no-op where malloc_trim does not exist."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
