"""Configs of the text decoder and of the whole model, and every released PaliGemma architecture by name.

`GemmaConfig` covers Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2); `PaliGemmaConfig` joins it with the SigLIP
config (modeling_siglip.py) and the special token ids. Defaults are the real checkpoints' values; `load_config` /
`config_from_dict` fill a sparse hub config.json from them and refuse what cannot be a PaliGemma config.

Checked against: transformers `models/{paligemma,gemma,gemma2}/configuration_*.py` (v5.23) and the released hub
configs (../shared/PALIGEMMA_FACTS.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from modeling_siglip import SiglipVisionConfig

# Gemma 2 values that PaliGemma 2 hub configs may leave out (the 3B omits heads and head_dim); every released size
# shares the soft-caps, the window and (but the 28B) query_pre_attn_scalar. The loader fills absent fields from it.
GEMMA2_DEFAULTS: dict = dict(
    model_type="gemma2", num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
)


@dataclass
class GemmaConfig:
    """Text decoder config. Defaults are PaliGemma-3B's (Gemma 2B); Gemma 2 fields are None when unused."""

    model_type: str = "gemma"  # "gemma" (PaliGemma 1) or "gemma2" (PaliGemma 2)
    vocab_size: int = 257216  # embedding rows: 257152 tokenizer ids + <image> + padding to a multiple of 64
    hidden_size: int = 2048  # residual width; the source of truth for sqrt(d) scaling (not the top-level one)
    intermediate_size: int = 16384  # gated-MLP width
    num_hidden_layers: int = 18  # decoder layers
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int = 1  # KV heads; 1 = multi-query (PaliGemma 1), 4/8/16 = grouped (PaliGemma 2)
    head_dim: int = 256  # per-head width; NOT hidden / heads (2048 / 8 = 256 here by coincidence only)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 8192  # longest sequence RoPE was trained for; prompts are checked against it
    query_pre_attn_scalar: float | None = None  # Gemma 2: queries scaled by this ** -0.5; None -> head_dim
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> tanh(s / c) * c before the mask
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> tanh(l / c) * c
    sliding_window: int | None = None  # Gemma 2: local-attention span of the sliding layers
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention"; None -> derived

    def __post_init__(self) -> None:
        if self.layer_types is None:
            if self.sliding_window is not None:
                # transformers (and Gemma 2 itself) alternate local/global starting with a local layer 0.
                self.layer_types = [
                    "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
                ]
            else:
                self.layer_types = ["full_attention"] * self.num_hidden_layers

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"


@dataclass
class PaliGemmaConfig:
    """Whole-model config: vision tower + projector + text decoder + the special token ids."""

    vision_config: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    text_config: GemmaConfig = field(default_factory=GemmaConfig)
    projection_dim: int = 2048  # projector output width; equals text hidden_size in every released checkpoint
    image_token_index: int = 257152  # id of <image>, placed num_image_tokens times before BOS
    bos_token_id: int = 2  # as config.json says; the processor takes BOS from the tokenizer
    pad_token_id: int = 0
    eos_token_id: list[int] = field(default_factory=lambda: [1])  # PaliGemma 2 configs list [1, 107]

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_image_tokens

    @classmethod
    def from_name(cls, name: str, **overrides) -> PaliGemmaConfig:
        """A released architecture by name (see `NAMED_CONFIGS`), with overrides.

        `text=` and `vision=` take dicts of sub-config overrides; other keywords replace top-level fields:
        `PaliGemmaConfig.from_name("paligemma-3b-224", text=dict(num_hidden_layers=2))`.
        """
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown config name {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
        base = NAMED_CONFIGS[name]
        text = replace(base.text_config, layer_types=None, **overrides.pop("text", {}))
        vision = replace(base.vision_config, **overrides.pop("vision", {}))
        return replace(base, text_config=text, vision_config=vision, **overrides)


def _named_configs() -> dict[str, PaliGemmaConfig]:
    """Every released PaliGemma architecture (weights differ between pt/mix/ft, shapes do not)."""
    def gemma2(**fields) -> GemmaConfig:
        return GemmaConfig(**{**GEMMA2_DEFAULTS, **fields})

    texts = {
        "paligemma-3b": GemmaConfig(),
        "paligemma2-3b": gemma2(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26),
        "paligemma2-10b": gemma2(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                 num_attention_heads=16, num_key_value_heads=8),
        "paligemma2-28b": gemma2(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                                 num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                 query_pre_attn_scalar=144),
    }
    out = {}
    for stem, text in texts.items():
        for size in (224, 448, 896):
            eos = [1, 107] if text.is_gemma2 else [1]
            out[f"{stem}-{size}"] = PaliGemmaConfig(
                vision_config=SiglipVisionConfig(image_size=size), text_config=text,
                projection_dim=text.hidden_size, eos_token_id=eos,
            )
    return out


NAMED_CONFIGS: dict[str, PaliGemmaConfig] = _named_configs()


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as-is; the message names the file/key and what to do.
    Raised here for config.json and by utils.py's loader for the rest (utils re-exports it)."""


# ---------------------------------------------------------------------------------------------------------------
# config.json -> PaliGemmaConfig
# ---------------------------------------------------------------------------------------------------------------

# Fields every released config lists; guessing them would only turn a broken config into shape errors.
_REQUIRED_TEXT = ("hidden_size", "intermediate_size", "num_hidden_layers")
_REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers")


def _pick(src: dict, cls, defaults: dict | None = None) -> dict:
    """The fields of dataclass `cls` present in `src` (JSON nulls mean 'absent'), over `defaults`."""
    names = set(cls.__dataclass_fields__)
    out = dict(defaults or {})
    out.update({k: v for k, v in src.items() if k in names and v is not None})
    return out


def config_from_dict(cfg: dict, source: str = "config.json") -> PaliGemmaConfig:
    """Parse a hub PaliGemma config dict (sparse: absent fields take the released checkpoints' values)."""
    if cfg.get("model_type") != "paligemma":
        raise CheckpointError(
            f"{source}: model_type is {cfg.get('model_type')!r}, not 'paligemma'; point --model_path at a PaliGemma "
            "checkpoint"
        )
    text = cfg.get("text_config") or {}
    vision = cfg.get("vision_config") or {}
    for section, d, required in (("text_config", text, _REQUIRED_TEXT), ("vision_config", vision, _REQUIRED_VISION)):
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: {section} must be an object")
        for name in required:
            if name not in d:
                raise CheckpointError(f"{source}: required field {section}.{name} is missing; re-download config.json")
            if isinstance(d[name], bool) or not isinstance(d[name], int) or d[name] < 1:
                raise CheckpointError(
                    f"{source}: {section}.{name} must be a positive integer, got {d[name]!r}; re-download config.json"
                )
    text_type = text.get("model_type", "gemma")
    if text_type not in ("gemma", "gemma2"):
        raise CheckpointError(f"{source}: text_config.model_type {text_type!r} is not supported (gemma, gemma2)")
    # hidden_activation / hidden_act are ignored on purpose: every PaliGemma uses tanh-approximate GELU, and
    # old Gemma configs say "gelu" while meaning exactly that.
    text_cfg = GemmaConfig(**_pick(text, GemmaConfig, GEMMA2_DEFAULTS if text_type == "gemma2" else None))
    vis_cfg = SiglipVisionConfig(**_pick(vision, SiglipVisionConfig))
    eos = cfg.get("eos_token_id", 1)
    top = {
        # The top-level hidden_size is stale in PaliGemma 2 configs: the projector width comes from
        # projection_dim, and failing that from the text width (never from top-level hidden_size).
        "projection_dim": cfg.get("projection_dim") or vision.get("projection_dim") or text_cfg.hidden_size,
        "image_token_index": cfg.get("image_token_index", cfg.get("image_token_id", 257152)),
        "bos_token_id": cfg.get("bos_token_id", 2),
        "pad_token_id": cfg.get("pad_token_id", 0),
        "eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else [eos],
    }
    if text_cfg.num_attention_heads % text_cfg.num_key_value_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads {text_cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {text_cfg.num_key_value_heads}"
        )
    if not 0 <= top["image_token_index"] < text_cfg.vocab_size:
        raise CheckpointError(
            f"{source}: image_token_index {top['image_token_index']} does not fit text_config.vocab_size "
            f"{text_cfg.vocab_size}; the config is damaged or from another model — re-download config.json"
        )
    if vis_cfg.image_size % vis_cfg.patch_size:
        raise CheckpointError(f"{source}: image_size {vis_cfg.image_size} is not a multiple of patch_size")
    return PaliGemmaConfig(vision_config=vis_cfg, text_config=text_cfg, **top)


def load_config(model_path: str | os.PathLike) -> PaliGemmaConfig:
    """Read and parse `<model_path>/config.json`."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; --model_path must be a checkpoint directory with config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return config_from_dict(cfg, str(path))
