"""The checks of PaliGemmaForConditionalGeneration.forward's arguments, kept out of modeling_gemma.py so the model
reads as the network alone: types, shapes, ids inside the vocabulary, cache positions, and the combinations
training needs (labels with a causal suffix). tests/test_hostile_api.py runs every rule.
"""

from __future__ import annotations

import torch

from configuration_paligemma import PaliGemmaConfig
from kv_cache import KVCache


def check_inputs(config: PaliGemmaConfig, input_ids, pixel_values=None, attention_mask=None, kv_cache=None,
                 input_pos=None, position_ids=None, token_type_ids=None, labels=None, prefix_len=None) -> None:
    """PaliGemmaForConditionalGeneration.forward's arguments against what they must be for a model of `config`;
    ValueError / TypeError naming the argument, raised here rather than as an index or shape error deep inside
    torch. Token values and cache positions are read (a device sync) on the CPU, and elsewhere only for calls of
    more than one token, so GPU decode stays async."""
    def need(ok: bool, message: str, error: type[Exception] = ValueError) -> None:
        if not ok:
            raise error(message)

    need(isinstance(input_ids, torch.Tensor) and not input_ids.is_floating_point() and not input_ids.is_complex()
         and input_ids.dtype != torch.bool, "input_ids must be an integer tensor (B, T) of "
         f"token ids, got {type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}", TypeError)
    need(input_ids.dim() == 2 and input_ids.numel() > 0,
         f"input_ids must be 2-D (batch, tokens) and not empty, got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids),
                    ("token_type_ids", token_type_ids), ("labels", labels)):
        need(t is None or (isinstance(t, torch.Tensor) and t.shape == input_ids.shape),
             f"{name} must have input_ids' shape {(B, T)}, got {tuple(getattr(t, 'shape', ()))}")
    if pixel_values is not None:
        vc = config.vision_config
        expected = (vc.num_channels, vc.image_size, vc.image_size)
        need(isinstance(pixel_values, torch.Tensor) and pixel_values.is_floating_point(),
             "pixel_values must be a float tensor (images, 3, S, S); build it with PaliGemmaProcessor", TypeError)
        need(pixel_values.dim() == 4 and tuple(pixel_values.shape[1:]) == expected,
             f"pixel_values must have shape (images, {', '.join(map(str, expected))}) for this model, got "
             f"{tuple(pixel_values.shape)}; build it with PaliGemmaProcessor (it resizes to {vc.image_size})")
    # Without token_type_ids or prefix_len the whole sequence, suffix included, is one bidirectional block: every
    # position would see the tokens it is trained to predict (a near-zero loss that teaches nothing).
    need(labels is None or token_type_ids is not None or prefix_len is not None, "labels need token_type_ids (1 on "
         "the suffix) or prefix_len, so the suffix attends causally; PaliGemmaProcessor(..., suffix=...) returns them")
    need(token_type_ids is None or kv_cache is None,
         "token_type_ids are for training without a kv_cache; generation uses prefix_len")
    if kv_cache is not None:
        need(isinstance(kv_cache, KVCache), "kv_cache must be a KVCache (model.new_kv_cache)", TypeError)
        need(kv_cache.k_cache.shape[1] == B, f"kv_cache was made for batch size {kv_cache.k_cache.shape[1]}, "
             f"but input_ids has {B} rows; make one with model.new_kv_cache({B}, max_seq_len)")
        need(input_pos is not None and input_pos.shape == (T,),
             f"with kv_cache, input_pos must be the {T} cache positions of these tokens, shape ({T},)")
    if input_ids.device.type != "cpu" and T == 1:
        return
    vocab = config.text_config.vocab_size
    image_id = config.image_token_index
    low, high = int(input_ids.min()), int(input_ids.masked_fill(input_ids == image_id, 0).max())
    need(low >= 0 and high < vocab, f"input_ids hold id {low if low < 0 else high}, outside this model's "
         f"vocabulary 0..{vocab - 1}; encode prompts with the checkpoint's tokenizer (PaliGemmaProcessor)")
    if kv_cache is not None:
        last = int(input_pos.max())
        need(int(input_pos.min()) >= 0 and last < kv_cache.max_seq_len, f"input_pos reaches cache position "
             f"{last}, but kv_cache holds {kv_cache.max_seq_len}; make a longer cache (model.new_kv_cache)")
