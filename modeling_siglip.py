"""SigLIP vision encoder, as used by PaliGemma (no pooling head).

Image (B, 3, S, S) -> patch embeddings + learned positions -> pre-LN transformer blocks -> post_layernorm
-> (B, (S / patch)^2, hidden). Module attribute names mirror the hub checkpoint keys under
`vision_tower.vision_model.*`, so loading needs no rename table.

Checked against: transformers `models/siglip/modeling_siglip.py` (v5.23, parity-tested in tests/),
big_vision `models/vit.py` (the original), and the PaliGemma paper (arXiv:2407.07726), section 3.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SiglipVisionConfig:
    """SigLIP So400m/14 as in PaliGemma; defaults are the real checkpoint's values."""

    hidden_size: int = 1152  # width of every token in the encoder
    intermediate_size: int = 4304  # MLP width (fc1 out / fc2 in)
    num_hidden_layers: int = 27  # encoder blocks
    num_attention_heads: int = 16  # heads per block (head_dim = hidden / heads = 72)
    num_channels: int = 3  # RGB input
    image_size: int = 224  # square input side; 448 and 896 checkpoints carry it in config.json
    patch_size: int = 14  # conv kernel == stride, so (image_size / 14)^2 patches
    layer_norm_eps: float = 1e-6  # old transformers defaulted to 1e-5, which is wrong for SigLIP
    attention_dropout: float = 0.0  # inference only; kept so configs round-trip

    @property
    def num_image_tokens(self) -> int:
        """Tokens the encoder emits per image: one per patch, no CLS token."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: SigLIP and Gemma were trained with it, not the exact erf form."""
    return F.gelu(x, approximate="tanh")


# The layers below compute in the dtype of their INPUT: a parameter of another dtype is cast for the call. With
# activations in the weights' dtype (the normal case) nothing changes. It lets bfloat16 weights run the prefill in
# float32 on CPUs without bfloat16 arithmetic (PaliGemmaForConditionalGeneration.forward's compute_dtype), where
# bf16 matmuls are several times slower than fp32 ones, while decode (memory-bound) stays in bf16.

_SCRATCH = threading.local()  # per thread: {(dtype, device): flat buffer} for weights cast to the input dtype


def _like(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """p in x's dtype. Large weights are cast into a reused per-thread buffer: a fresh 134 MB float32 copy per
    matmul would cost page faults on every allocation (the float32 prefill of bf16 weights casts ~3 B of them).
    The result is only valid until the next cast, which is all a layer's single matmul needs."""
    if p is None or p.dtype == x.dtype:
        return p
    if p.is_mkldnn:  # a packed weight (pack_linear_weights) met activations of another dtype: unpack first
        p = p.to_dense()
    if p.numel() < (1 << 20) or torch.compiler.is_compiling():
        return p.to(x.dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (x.dtype, p.device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < p.numel():
        buf = buffers[key] = torch.empty(p.numel(), dtype=x.dtype, device=p.device)
    return buf[: p.numel()].view(p.shape).copy_(p)


# float32 x @ W.T on x86 CPUs through oneDNN instead of ATen's default (MKL sgemm/sgemv). Measured on the
# project's 2-core AMD EPYC with PaliGemma-3B shapes (benchmarks/speed.py): prefill matmuls 163 -> ~400 GFLOP/s,
# decode matrix-vector products 22 -> ~38 GB/s of weights (MKL's gemv ran on one core). Same float32 arithmetic,
# another summation order: logits move by ~1e-6 relative (tests/test_parity.py bounds it at 1e-5). Switch off
# (ONEDNN_LINEAR = False) to get ATen's kernels; bf16 matmuls already go through oneDNN in ATen.
ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and platform.machine().lower() in ("x86_64", "amd64")
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed through oneDNN for float32 CPU inference (see ONEDNN_LINEAR) and for packed weights."""
    # Packed weights (pack_linear_weights) are in oneDNN's own layout: only oneDNN can read them. Otherwise the
    # op has no autograd formula, so gradients (fine-tuning) take F.linear; under torch.compile inductor picks
    # its own matmul kernels (its lowering of this op expects prepacked weights).
    if weight.is_mkldnn or (
            ONEDNN_LINEAR and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not (x.requires_grad or weight.requires_grad) and weight.is_contiguous()
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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


def pack_linear_weights(model: nn.Module) -> int:
    """Repack the bfloat16 CPU weights of every `Linear` into oneDNN's blocked layout for batch-1 inference;
    returns how many. Same results bit for bit; decode's matrix-vector products read ~47 GB/s instead of ~30
    on the project's CPU (README "Speed"), and prefill GEMMs are no slower. The weights become opaque oneDNN
    tensors: fine for inference on this CPU, but not for saving, .to(device), data_ptr() or torch.compile —
    reload the checkpoint (load_hf_model(..., pack=False)) for a dense model. One weight is copied at a time."""
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
    """Hand the heap pages freed by the dense weights back to the OS (glibc keeps them otherwise: +0.5 GB RSS
    for PaliGemma-3B, measured). A no-op where malloc_trim does not exist."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class Linear(nn.Linear):
    """nn.Linear computing in the input's dtype (see above); same parameters and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, _like(self.weight, x), _like(self.bias, x))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input's dtype (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps)


class Conv2d(nn.Conv2d):
    """nn.Conv2d computing in the input's dtype (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _like(self.weight, x), _like(self.bias, x))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        # Non-overlapping patches: kernel == stride == patch_size, no padding ("valid").
        self.patch_embedding = Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        # Learned absolute positions, one per patch (sized by image_size, so 224/448/896 differ here).
        self.position_embedding = nn.Embedding(config.num_image_tokens, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        # Adding the weight directly (not an index lookup) keeps the graph free of an arange buffer.
        return x + _like(self.position_embedding.weight, x)


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        # SigLIP attention projections carry biases (Gemma's do not).
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        # Every patch sees every patch (no mask); default scale is head_dim^-0.5 as in the reference.
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out_proj(y)


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        # PaliGemma feeds the post-LN patch tokens to the projector; there is no attention-pooling head.
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    """`vision_tower` in PaliGemma: (B, 3, S, S) pixel values in [-1, 1] -> (B, N, hidden) patch features."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        # The extra `vision_model` level exists only so attribute paths equal the checkpoint keys.
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """compute_dtype: the arithmetic dtype (default: the weights'); pixels are cast to it."""
        return self.vision_model(pixel_values.to(compute_dtype or self.vision_model.post_layernorm.weight.dtype))
