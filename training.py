"""Fine-tuning pieces that inference never runs: the loss, what each preset trains, and LoRA through peft.

- `causal_lm_loss`: next-token cross-entropy over the labelled (suffix) tokens, the mean over tokens as
  transformers' `ForCausalLMLoss` computes it (labels shifted by one, -100 ignored, logits upcast from bf16/fp16),
  or big_vision's per-example mean (`reduction="example"`: each example's token mean, then the batch mean, as
  big_vision's `finetune_paligemma.ipynb` does; it differs from the token mean when suffix lengths differ).
- `apply_preset`: `full` (everything), `llm` (vision tower and projector frozen), `attn` (only the decoder's
  attention projections, as big_vision's fine-tuning notebook trains `llm/layers/attn/`), `lora` (peft's LoRA on
  the decoder's q/k/v/o/gate/up/down projections, everything else frozen).

Checked against: transformers `loss/loss_utils.py` and `models/paligemma/modeling_paligemma.py` (v5.23), peft 0.21
(tests/test_training.py compares loss and every gradient in float64, and LoRA against transformers + peft).
The prefix-LM mask itself (image + prompt bidirectional, suffix causal) is built in modeling_gemma.py.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
PRESETS = ("full", "llm", "attn", "lora")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The decoder's projections only: SigLIP has q/k/v_proj too, which a bare list of names would also catch. Matches
# our names (language_model.model.layers.3.mlp.up_proj) and transformers' (model.language_model.layers.3...).
LORA_TARGET_REGEX = r".*language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(LORA_MODULES) + ")"
_ATTN_PARAM = re.compile(r"(?:^|\.)language_model\.model\.layers\.\d+\.self_attn\.")


class TrainingError(ValueError):
    """A bad training argument (unknown preset or reduction, labels of the wrong shape)."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Mean next-token cross-entropy: position t's logits predict labels[t + 1]; labels of -100 count nowhere.

    logits (B, T, V), labels (B, T). reduction "token": the mean over every labelled token of the batch
    (transformers); "example": per example the mean over its tokens, then the mean over the batch (big_vision;
    an example without labels counts as 0 there, as its clip(count, 1) makes it).
    """
    if labels.shape != logits.shape[:2]:
        raise TrainingError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])} "
                            "(one per input token)")
    if reduction not in ("token", "example"):
        raise TrainingError(f"unknown loss reduction {reduction!r}; use 'token' or 'example'")
    target = labels[:, 1:].to(logits.device)
    picked = target != IGNORE_INDEX  # (B, T-1)
    # Only the labelled positions: the 257k-wide softmax over the rest is wasted.
    return _reduce(logits[:, :-1][picked], target[picked], picked, reduction)


def loss_weight(labels: torch.Tensor, reduction: str = "token") -> int:
    """How many terms causal_lm_loss's mean is over: labelled tokens after the one-position shift ("token"), or
    examples ("example"). A mean times its weight is a sum, so means over several batches combine exactly."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if reduction == "token" else labels.shape[0]


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "token") -> torch.Tensor:
    """model(**batch)["loss"] (with causal_lm_loss's reduction) computed leaner: the tied 257k-wide LM head runs
    only on the labelled positions, not on every image and prompt position, which saves its matmul forward and
    backward and the (B, T, V) logits' memory. batch: the processor's output with suffix= (labels, token_type_ids);
    model: ours, or peft's wrapping of it."""
    if reduction not in ("token", "example"):
        raise TrainingError(f"unknown loss reduction {reduction!r}; use 'token' or 'example'")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's LoRA layers are inside
    x = base.embed(batch["input_ids"], batch.get("pixel_values"))
    hidden = base.language_model.model(x, batch.get("attention_mask"), prefix_mask=batch["token_type_ids"] == 0)
    target = batch["labels"][:, 1:]
    picked = target != IGNORE_INDEX
    return _reduce(base.language_model.head(hidden[:, :-1][picked]), target[picked], picked, reduction)


def _reduce(rows: torch.Tensor, targets: torch.Tensor, picked: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of the labelled positions' logits rows (N, V) against targets (N,), reduced; picked (B, T-1)
    says which positions the rows are (row-major), for the per-example mean."""
    if rows.dtype in (torch.bfloat16, torch.float16):
        rows = rows.float()  # transformers upcasts too; float32 and float64 stay as they are
    per_token = F.cross_entropy(rows, targets, reduction="none")
    if reduction == "token":
        return per_token.mean()
    example = picked.nonzero()[:, 0]  # the row of each labelled token
    sums = per_token.new_zeros(picked.shape[0]).index_add(0, example, per_token)
    counts = picked.sum(1).clamp(min=1).to(per_token.dtype)
    return (sums / counts).mean()


def apply_preset(model: nn.Module, preset: str, lora_rank: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.0) -> nn.Module:
    """Mark what `preset` trains (requires_grad) and return the model to train: `model` itself, or for "lora" the
    peft model wrapping it (its LoRA weights are the only trainable ones; `merge_lora` folds them back)."""
    if preset not in PRESETS:
        raise TrainingError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if preset == "lora":
        return add_lora(model, lora_rank, lora_alpha, lora_dropout)
    for name, p in model.named_parameters():
        if preset == "full":
            p.requires_grad_(True)
        elif preset == "llm":
            p.requires_grad_(name.startswith("language_model."))
        else:  # attn
            p.requires_grad_(bool(_ATTN_PARAM.search(name)))
    return model


def lora_config(rank: int = 8, alpha: int = 16, dropout: float = 0.0):
    """peft's LoraConfig for the decoder's seven projections (the same config serves transformers' model)."""
    from peft import LoraConfig  # imported here: inference never needs peft

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_REGEX, bias="none")


def add_lora(model: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.0) -> nn.Module:
    """model wrapped by peft with LoRA adapters (A random, B zero: the model's output is unchanged at first)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(rank, alpha, dropout))


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (W + B A · alpha / r), peft's merge_and_unload."""
    return peft_model.merge_and_unload()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter, for those that train."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# Adapter files use transformers' module paths (model.language_model.layers.*), so transformers + peft load them
# with PeftModel.from_pretrained; ours are language_model.model.layers.*.
_OURS, _THEIRS = "base_model.model.language_model.model.", "base_model.model.model.language_model."


def save_adapter(peft_model: nn.Module, directory, base_model_path: str) -> None:
    """peft's adapter format in `directory`: adapter_model.safetensors + adapter_config.json."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model)
    state = {_THEIRS + k.removeprefix(_OURS): v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_model_path
    config.save_pretrained(str(directory))


def load_adapter(peft_model: nn.Module, directory) -> None:
    """The adapter weights of save_adapter's `directory` into a model made by add_lora with the same rank."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(directory / "adapter_model.safetensors"))
    state = {_OURS + k.removeprefix(_THEIRS): v for k, v in saved.items()}
    fix = "resume with the same --preset and --lora_rank"
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:  # torch's "size mismatch for ...lora_A...": an adapter of another rank
        first = str(e).strip().splitlines()[-1].strip()
        raise TrainingError(f"{directory}: the adapter does not fit this model ({first}); {fix}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise TrainingError(f"{directory}: the adapter does not fit this model (missing {missing[:3]}, unexpected "
                            f"{list(result.unexpected_keys)[:3]}); {fix}")
