"""The decoder's preallocated key/value cache (gpt-fast style): one buffer per keys and values for every layer,
written in place at tensor positions, so decoding never grows a tensor and a compiled decode step keeps its
addresses. `PaliGemmaForConditionalGeneration.new_kv_cache` makes one; modeling_gemma.py re-exports the class.

Checked against: transformers' StaticCache semantics (positions written by index; parity tests in tests/).
"""

from __future__ import annotations

import torch
from torch import nn

from configuration_paligemma import GemmaConfig


class KVCache(nn.Module):
    """Preallocated keys/values for every layer, written in place at tensor positions (never grown by cat).

    k_cache, v_cache: (layers, B, n_kv_heads, max_seq_len, head_dim). `valid` marks which positions of each row
    hold a real (non-padding) token, so attention masks can be built from the cache alone during decode.
    """

    def __init__(self, config: GemmaConfig, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.register_buffer("valid", valid, persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[3]

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions `input_pos` (T,); return the layer's whole cache."""
        k_all, v_all = self.k_cache[layer_idx], self.v_cache[layer_idx]  # views, (B, n_kv, S, hd)
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all

    def update_mask(self, input_pos: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Record which of the new positions are real tokens; return the (B, S) validity of every position."""
        self.valid.index_copy_(1, input_pos, attention_mask.to(torch.bool))
        return self.valid
