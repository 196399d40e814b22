"""Gemma / Gemma 2 decoder, preallocated KV cache, and the PaliGemma wrapper (vision tower + projector + decoder).

One decoder serves PaliGemma 1 (Gemma, `model_type="gemma"`) and PaliGemma 2 (Gemma 2, `"gemma2"`); the
differences are config switches: Gemma 2 adds two extra norms per layer, attention-logit and final-logit
soft-capping, a sliding window on alternate layers and `query_pre_attn_scalar`.

Module attribute names mirror the hub checkpoint keys (`language_model.model.layers.{i}.self_attn.q_proj`,
`multi_modal_projector.linear`, ...), so the legacy hub layout loads without a rename table. The configs live in
configuration_paligemma.py (importable from here too); which kernel runs a Linear is ops.py's business.

Checked against: transformers `models/{paligemma,gemma,gemma2}/modeling_*.py` (v5.23; parity tests in tests/),
big_vision `models/proj/paligemma/paligemma.py` and `models/ppp/gemma.py`, google/gemma_pytorch, and the
PaliGemma / PaliGemma 2 papers (arXiv:2407.07726, 2412.03555).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from configuration_paligemma import NAMED_CONFIGS, GemmaConfig, PaliGemmaConfig  # noqa: F401 — re-exported
from kv_cache import KVCache  # noqa: F401 — re-exported: the model makes and reads it
from model_inputs import check_inputs
from modeling_siglip import SiglipVisionModel
from ops import Embedding, Linear, gelu_tanh, linear
from training import causal_lm_loss


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        # Stored as an offset from 1: Gemma scales by (1 + w), so a zero weight is the identity.
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 throughout, and the (1 + w) multiply happens before casting back: in bf16 this order
        # matters (Gemma's reference differs from Llama's cast-then-multiply).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Split-halves RoPE layout (Gemma/transformers): pairs are (i, i + d/2), not interleaved (i, i + 1).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for per-row 0-based positions (B, T); angles computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    # RoPE is relative, so the first position's number is free in exact arithmetic (big_vision uses 0), but the
    # float32 angle p * theta_i rounds differently per p: at a few hundred positions that alone moves logits past
    # the parity tolerance. transformers numbers from 1; doing the same makes our float32 logits match it exactly.
    freqs = (position_ids.float() + 1.0)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """Attention with n_kv < n_heads, the KV heads broadcast rather than copied per query head.

    q: (B, H, T, hd); k, v: (B, H_kv, S, hd); mask: (B, 1, T, S) bool, True = may attend. Returns (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    rep = H // n_kv
    if softcap is None and T > 1 and q.requires_grad and torch.is_grad_enabled():
        # Training: SDPA's CPU backward parallelises over batch x heads, so folded query heads (below) would leave
        # it one head per KV group to run on one thread (15x slower for MQA). K/V copied per query head instead.
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Query head h uses KV head h // rep (transformers' repeat_kv order). Folding the `rep` query heads of
    # a group into the row axis lets one KV head serve them all without materialising copies of K/V.
    q = q.reshape(B, n_kv, rep * T, hd)  # (B, H_kv, rep*T, hd)
    mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)  # (B, 1, rep*T, S)
    if softcap is None and T > 1:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        # Explicit attention for Gemma 2 (SDPA cannot soft-cap: cap the scores before masking) and for decoding
        # (T = 1): a fused SDPA kernel spends its fixed cost on a problem of one query row per head, where these
        # three small kernels (fused further under torch.compile) cost a fraction of it.
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H_kv, rep*T, S)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in float32
        y = torch.matmul(probs, v)
    return y.reshape(B, H, T, hd)


class GemmaAttention(nn.Module):
    """Causal / prefix-LM self-attention with RoPE, MQA/GQA and (Gemma 2) soft-capping; writes the KV cache."""

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # PaliGemma 1: head_dim^-0.5. Gemma 2: query_pre_attn_scalar^-0.5 (differs from head_dim for 28B).
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                input_pos: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        cos, sin = cos_sin
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v)  # (B, H_kv, S, hd)
            if k.dtype != q.dtype:  # a float32 prefill over a bf16 cache (forward's compute_dtype)
                k, v = k.to(q.dtype), v.to(q.dtype)
        y = grouped_attention(q, k, v, mask, self.scale, self.softcap)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    """Gated MLP without biases."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gated GELU (tanh approximation): down(gelu(gate(x)) * up(x)).
        h = gelu_tanh(self.gate_proj(x))
        # Without autograd the product goes into gelu's output: one (B, T, intermediate) tensor fewer at the
        # prefill's peak (17 MB at 260 tokens of PaliGemma-3B in float32). Training keeps the out-of-place op.
        return self.down_proj(h.mul_(self.up_proj(x)) if not torch.is_grad_enabled() else h * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; Gemma 2 adds post-norms ("sandwich")."""

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = GemmaAttention(config, layer_idx)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sandwich = config.is_gemma2
        if self.sandwich:
            # Gemma 2 normalises the outputs of attention and MLP too ("sandwich" norms).
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, masks, input_pos, kv_cache):
        mask = masks["sliding"] if self.is_sliding else masks["full"]
        h = self.self_attn(self.input_layernorm(x), cos_sin, mask, input_pos, kv_cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        # Gemma 1: post_attention_layernorm is the pre-MLP norm, despite its name.
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    """Embeddings + decoder layers + final norm (checkpoint prefix `language_model.model.`).

    forward takes embeddings, not ids: PaliGemma places image features among the token embeddings first."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # Training: recompute each layer's activations in the backward pass instead of keeping them.
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings x (B, T, D) -> final-normed hidden states (B, T, D); arguments as in PaliGemma's forward
        (prefix_mask: its token_type_ids == 0)."""
        B, T, _ = x.shape
        device = x.device
        if input_pos is None:
            if kv_cache is not None:
                raise ValueError("input_pos (the cache positions of these tokens) is required with kv_cache")
            input_pos = torch.arange(T, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = input_pos[None].expand(B, T)
        if kv_cache is not None:
            key_valid = kv_cache.update_mask(input_pos, attention_mask)
            key_pos = torch.arange(kv_cache.max_seq_len, device=device)
        else:
            key_valid, key_pos = attention_mask.to(torch.bool), input_pos
        masks = build_attention_masks(key_valid, key_pos, input_pos, prefix_len, self.config.sliding_window,
                                      prefix_mask)
        cos_sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos_sin, masks, input_pos, kv_cache,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos_sin, masks, input_pos, kv_cache)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """Holds `model` so attribute paths equal `language_model.model.*`; the LM head is the tied embedding."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor | None = None, num_logits_to_keep: int = 0,
                prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (B, T, D) -> logits (B, T or num_logits_to_keep, V); arguments as in PaliGemma's forward."""
        x = self.model(x, attention_mask, kv_cache, input_pos, position_ids, prefix_len, prefix_mask)
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]  # prefill: skip the 257k-wide head for every prompt position
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., D) -> logits (..., V)."""
        # lm_head tied to the token embeddings. The few rows of x are cast to the weights' dtype, never the
        # 257k x hidden weight to x's (a float32 copy of it would be as large as all other weights together).
        embed = self.model.embed_tokens
        if hasattr(embed, "attend"):  # an int8 embedding (quantize.Int8Embedding) runs its own int8 matmul
            logits = embed.attend(x)
        else:
            logits = linear(x.to(embed.weight.dtype), embed.weight)
        if self.config.final_logit_softcapping is not None:
            c = self.config.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits


class PaliGemmaMultiModalProjector(nn.Module):
    """SigLIP width -> text width."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        # One Linear with bias, no activation (config's projector_hidden_act is unused by every checkpoint).
        self.linear = Linear(config.vision_config.hidden_size, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_attention_masks(key_valid: torch.Tensor, key_pos: torch.Tensor, input_pos: torch.Tensor,
                          prefix_len: int | torch.Tensor | None, sliding_window: int | None,
                          prefix_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Prefix-LM masks (B, 1, T, S), True = may attend.

    A query at position q sees key k when k holds a real token and either k <= q (causal) or both lie in the
    prefix (image tokens, BOS, prompt, "\\n" attend to each other bidirectionally). `prefix_len` None means
    "this call is one block": its tokens see each other (and, causally, everything before them), which is the
    prefix during prefill and plain causal attention for a single decoded token. Sliding layers additionally require
    k > q - window for the causal part; prefix pairs stay visible, as in transformers' PaliGemma 2.
    prefix_mask (B, T), training without a cache (T = S): per row, the tokens of the bidirectional block (image,
    prompt and left padding, token_type_ids == 0); it replaces prefix_len, and the suffix after it is causal.
    """
    q = input_pos[:, None]  # (T, 1)
    k = key_pos[None, :]  # (1, S)
    if prefix_len is None:  # the block is this call's own positions
        start, end = input_pos[0], input_pos[-1] + 1
    else:
        start, end = 0, prefix_len
    causal = k <= q
    if prefix_mask is None:
        prefix = ((k >= start) & (k < end) & (q >= start) & (q < end))[None, None]  # (1, 1, T, S)
    else:
        prefix = prefix_mask[:, None, :, None] & prefix_mask[:, None, None, :]  # (B, 1, T, S)
    valid = key_valid[:, None, None, :]  # (B, 1, 1, S)
    masks = {"full": valid & (causal[None, None] | prefix), "sliding": None}
    if sliding_window is not None:
        local = causal & (k > q - sliding_window)
        masks["sliding"] = valid & (local[None, None] | prefix)
    return masks


class PaliGemmaForConditionalGeneration(nn.Module):
    """PaliGemma: SigLIP features -> linear projector -> Gemma decoder over [image tokens, BOS, prompt, "\\n"]."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config)
        self.language_model = GemmaForCausalLM(config.text_config)
        self._reused_caches: dict[tuple[int, int], KVCache] = {}  # new_kv_cache(reuse=True); not module state

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The final norm's, not the embedding's: an int8 model (quantize.py) keeps its float parts in this dtype.
        return self.language_model.model.norm.weight.dtype

    def new_kv_cache(self, batch_size: int, max_seq_len: int, reuse: bool = False) -> KVCache:
        """A cache sized for `max_seq_len` positions (prompt + new tokens) on the model's device and dtype.

        reuse=True (for a compiled decode step): the model keeps one cache per (batch_size, max_seq_len rounded
        up to 256) and hands the same one out again, zeroed in place, its buffers marked as static addresses, so
        CUDA graphs recorded for it stay valid across calls and few lengths need their own graph. (Stale values
        would sit at masked positions, but a NaN there would still leak through the attention's matmul.)
        """
        if not reuse:
            return KVCache(self.config.text_config, batch_size, max_seq_len, self.dtype, self.device)
        size = -(-max_seq_len // 256) * 256
        cache = self._reused_caches.get((batch_size, size))
        if cache is None or cache.k_cache.dtype != self.dtype or cache.k_cache.device != self.device:
            cache = self._reused_caches[(batch_size, size)] = self.new_kv_cache(batch_size, size)
            for buf in cache.buffers():
                torch._dynamo.mark_static_address(buf)  # updated in place by the graph, never reallocated
        for buf in cache.buffers():
            buf.zero_()
        return cache

    def get_image_features(self, pixel_values: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_image_tokens, text hidden): vision tower then projector, no scaling."""
        return self.multi_modal_projector(self.vision_tower(pixel_values, compute_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Token embeddings with the image features placed at the <image> positions. (B, T, D)"""
        embed_tokens = self.language_model.model.embed_tokens
        is_image = input_ids == self.config.image_token_index
        # Beyond the embedding rows (a custom vocab) <image> looks up row 0, replaced below; inside (every released
        # checkpoint) its own row, as in transformers: a generated <image> (no pixel_values) is any other token.
        beyond_vocab = self.config.image_token_index >= self.config.text_config.vocab_size
        ids = input_ids.masked_fill(is_image, 0) if beyond_vocab else input_ids
        x = embed_tokens(ids).to(compute_dtype or self.dtype)
        # Gemma scales text embeddings by sqrt(hidden), with the multiplier rounded to the activation dtype
        # first (45.25 in bf16 for 2048), exactly as the reference does.
        x = x * torch.tensor(math.sqrt(self.config.text_config.hidden_size), dtype=x.dtype, device=x.device)
        if pixel_values is not None:
            feats = self.get_image_features(pixel_values, x.dtype)  # (B_img, N, D), computed in x's dtype
            n_slots = int(is_image.sum())
            if n_slots != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"input_ids hold {n_slots} <image> tokens but the images give {feats.shape[0] * feats.shape[1]}"
                    f" features ({feats.shape[0]} images x {feats.shape[1]}); build prompts with PaliGemmaProcessor"
                )
            # Image features enter unscaled, as in big_vision (transformers' older divide-then-multiply by
            # sqrt(hidden) is the same up to rounding). Row-major fill matches "<image> x N per sample" order.
            # feats.to: under torch.autocast (bf16 fine-tuning) the projector returns bf16 while x stays float32.
            x = x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        return x

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor | None = None, num_logits_to_keep: int = 0,
                compute_dtype: torch.dtype | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the decoder over `input_ids` (B, T) and return {"logits": (B, T or num_logits_to_keep, V)}.

        input_ids: token ids with `<image>` × N where images go; pixel_values: (B, 3, S, S) or None once the
        image is in the cache. attention_mask: (B, T), 0 for (left) padding. kv_cache: a `KVCache`; then
        `input_pos` (T,) gives the cache slots to write (required). position_ids: (B, T) RoPE positions per row
        (default: input_pos). prefix_len: tokens at positions < prefix_len attend bidirectionally; default: the
        tokens of this call form one bidirectional block (prefill), which for one token is plain causal decoding.
        num_logits_to_keep: 0 = all positions, n = the last n (generation needs 1). compute_dtype: the dtype the
        activations and arithmetic use (default: the weights'); weights of another dtype are cast per layer, the
        KV cache keeps its own dtype. generate_ids prefills bf16 weights in float32 on CPUs without bf16 arithmetic.
        Fine-tuning (no kv_cache; see training.py): token_type_ids (B, T), 0 on image + prompt (+ padding), 1 on
        the suffix: the former attend bidirectionally, the suffix causally. labels (B, T): target ids, -100 where
        no loss; adds "loss", the mean cross-entropy over labelled tokens after the one-position shift.
        """
        if not torch.compiler.is_compiling():  # compiled decode steps come from generate_ids, already checked
            check_inputs(self.config, input_ids, pixel_values, attention_mask, kv_cache, input_pos, position_ids,
                         token_type_ids, labels, prefix_len)
        prefix_mask = None if token_type_ids is None else token_type_ids == 0
        x = self.embed(input_ids, pixel_values, compute_dtype)
        out = {"logits": self.language_model(x, attention_mask, kv_cache, input_pos, position_ids, prefix_len,
                                             num_logits_to_keep, prefix_mask)}
        if labels is not None:
            out["loss"] = causal_lm_loss(out["logits"], labels)
        return out
