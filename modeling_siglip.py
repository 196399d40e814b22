"""SigLIP vision encoder, as used by PaliGemma (no pooling head).

Image (B, 3, S, S) -> patch embeddings + learned positions -> pre-LN transformer blocks -> post_layernorm
-> (B, (S / patch)^2, hidden). Module attribute names mirror the hub checkpoint keys under
`vision_tower.vision_model.*`, so loading needs no rename table. The layers (`Linear`, `LayerNorm`, `Conv2d`)
are torch's, computing in the dtype of their input; which kernel runs them is ops.py's business.

Checked against: transformers `models/siglip/modeling_siglip.py` (v5.23, parity-tested in tests/),
big_vision `models/vit.py` (the original), and the PaliGemma paper (arXiv:2407.07726), section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ops import Conv2d, Embedding, LayerNorm, Linear, cast_like, gelu_tanh


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


class SiglipVisionEmbeddings(nn.Module):
    """Patchify with a strided conv, then add one learned position per patch: (B, 3, S, S) -> (B, N, D)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        # Non-overlapping patches: kernel == stride == patch_size, no padding ("valid").
        self.patch_embedding = Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        # Learned absolute positions, one per patch (sized by image_size, so 224/448/896 differ here).
        self.position_embedding = Embedding(config.num_image_tokens, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        # Adding the weight directly (not an index lookup) keeps the graph free of an arange buffer.
        return x + cast_like(self.position_embedding.weight, x)


class SiglipAttention(nn.Module):
    """Multi-head self-attention over all patches (no mask, no RoPE)."""

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
    """fc2(gelu_tanh(fc1(x))), with biases."""

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
    """The stack of pre-LN blocks."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings -> encoder -> post_layernorm (checkpoint prefix `vision_tower.vision_model.`)."""

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
