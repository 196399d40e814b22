"""Configs of the text decoder and of the whole model, and every released PaliGemma architecture by name.

`GemmaConfig` covers Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2); `PaliGemmaConfig` joins it with the SigLIP
config (modeling_siglip.py) and the special token ids. Defaults are the real checkpoints' values; `load_config` /
`config_from_dict` fill a sparse hub config.json from them and refuse what cannot be a PaliGemma config.

Checked against: transformers `models/{paligemma,gemma,gemma2}/configuration_*.py` (v5.23) and the released hub
configs (../shared/PALIGEMMA_FACTS.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

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
        if self.layer_types is None and _COUNT[1](self.num_hidden_layers):  # a bad count: check_config says so
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

    def __post_init__(self) -> None:
        if type(self.eos_token_id) is int:  # config.json may give one id or a list (PaliGemma 2: [1, 107])
            self.eos_token_id = [self.eos_token_id]
        check_config(self)  # every way in (config.json, from_name, replace, the constructor) is checked

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

# ---------------------------------------------------------------------------------------------------------------
# What every field may hold: the one place config values are checked
# ---------------------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message starts with the field's dotted name.
    config_from_dict turns it into a CheckpointError naming config.json."""


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    # type() rather than isinstance(): True is an int to Python, and JSON's 32.0 or "32" must not pass as 32.
    return lambda v: type(v) is int and low <= v <= high


def _finite_positive(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


# Upper bounds far above every released model (vocab 257216, width 4608, 46 layers, 896 px), low enough that a
# damaged value is refused here rather than hanging or overflowing while the model is built.
_SIZE = ("a positive integer up to 2**24", _int_in(1, 2**24))
_COUNT = ("a positive integer up to 1024", _int_in(1, 1024))
_FINITE_POSITIVE = ("a finite number > 0", _finite_positive)
_OPTIONAL_FINITE_POSITIVE = ("a finite number > 0, or absent", _optional(_finite_positive))
_TOKEN_ID = ("a token id (an integer >= 0)", lambda v: type(v) is int and v >= 0)
_LAYER_TYPES = ("full_attention", "sliding_attention")

# (what the value must be, the test), per field of each dataclass. A field missing here is a bug that
# test_hostile_config.py catches (every field of every config class must have a rule).
_RULES: dict[type, dict[str, tuple[str, Callable[[Any], bool]]]] = {
    GemmaConfig: {
        "model_type": ("'gemma' or 'gemma2'", lambda v: v in ("gemma", "gemma2")),
        "vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _COUNT,
        "num_attention_heads": _COUNT, "num_key_value_heads": _COUNT, "head_dim": _SIZE,
        "max_position_embeddings": _SIZE,
        "rms_norm_eps": _FINITE_POSITIVE, "rope_theta": _FINITE_POSITIVE,
        "query_pre_attn_scalar": _OPTIONAL_FINITE_POSITIVE, "attn_logit_softcapping": _OPTIONAL_FINITE_POSITIVE,
        "final_logit_softcapping": _OPTIONAL_FINITE_POSITIVE,
        "sliding_window": ("a positive integer up to 2**24, or absent", _optional(_int_in(1, 2**24))),
        "layer_types": ("a list of 'full_attention' / 'sliding_attention'",
                        lambda v: type(v) is list and all(t in _LAYER_TYPES for t in v)),
    },
    SiglipVisionConfig: {
        "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _COUNT,
        "num_attention_heads": _COUNT, "image_size": ("a positive integer up to 16384", _int_in(1, 2**14)),
        "patch_size": ("a positive integer up to 16384", _int_in(1, 2**14)),
        # The processor makes RGB pixels; another channel count would fail only inside the first convolution.
        "num_channels": ("3 (PaliGemma reads RGB images)", lambda v: type(v) is int and v == 3),
        "layer_norm_eps": _FINITE_POSITIVE,
        "attention_dropout": ("a number in [0, 1)", lambda v: type(v) in (int, float) and 0 <= v < 1),
    },
    PaliGemmaConfig: {
        "projection_dim": _SIZE,
        # The token ids are checked against the vocabulary in _check_token_ids; here only their type.
        "image_token_index": _TOKEN_ID, "bos_token_id": _TOKEN_ID, "pad_token_id": _TOKEN_ID,
        "eos_token_id": ("a token id or a non-empty list of them (integers >= 0)",  # one id is listed already
                         lambda v: type(v) is list and v and all(type(t) is int and t >= 0 for t in v)),
    },
}
_SECTIONS = {GemmaConfig: "text_config.", SiglipVisionConfig: "vision_config.", PaliGemmaConfig: ""}


def _check_fields(obj: Any) -> None:
    for f in fields(obj):
        if f.name in ("text_config", "vision_config"):
            continue  # checked on their own
        rule = _RULES[type(obj)][f.name]  # a field without a rule is a KeyError on every config: a bug, not a pass
        value = getattr(obj, f.name)
        if not rule[1](value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ConfigError(f"{_SECTIONS[type(obj)]}{f.name} must be {rule[0]}, got {shown}")


def check_config(config: PaliGemmaConfig) -> None:
    """Every field's type and range, then what the fields must agree on; raises ConfigError naming the field.

    Checked once, here, so that no bad value reaches the model as a ZeroDivisionError, a shape error after the
    load, or a NaN answer (rms_norm_eps NaN, rope_theta 0)."""
    text, vision = config.text_config, config.vision_config
    for obj in (text, vision, config):
        _check_fields(obj)
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError(f"text_config.num_attention_heads ({text.num_attention_heads}) must be a multiple of "
                          f"text_config.num_key_value_heads ({text.num_key_value_heads})")
    if len(text.layer_types) != text.num_hidden_layers:
        raise ConfigError(f"text_config.layer_types lists {len(text.layer_types)} layers, but num_hidden_layers is "
                          f"{text.num_hidden_layers}")
    if "sliding_attention" in text.layer_types and text.sliding_window is None:
        raise ConfigError("text_config.layer_types has sliding_attention layers but text_config.sliding_window "
                          "is absent")
    if vision.hidden_size % vision.num_attention_heads:
        raise ConfigError(f"vision_config.hidden_size ({vision.hidden_size}) must be a multiple of "
                          f"vision_config.num_attention_heads ({vision.num_attention_heads})")
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"vision_config.image_size ({vision.image_size}) must be a multiple of "
                          f"vision_config.patch_size ({vision.patch_size})")
    if config.projection_dim != text.hidden_size:
        # The projector writes image features into the text embeddings: their widths must match.
        raise ConfigError(f"projection_dim ({config.projection_dim}) must equal text_config.hidden_size "
                          f"({text.hidden_size})")
    for name in ("image_token_index", "bos_token_id", "pad_token_id", "eos_token_id"):
        for token in (getattr(config, name) if name == "eos_token_id" else [getattr(config, name)]):
            if token >= text.vocab_size:
                raise ConfigError(f"{name} {token} does not fit text_config.vocab_size {text.vocab_size}")


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


def _rope_and_head(cfg: dict, text: dict, source: str) -> dict:
    """text_config with its RoPE base read from wherever the config keeps it, after refusing what this model does
    not implement (rather than ignoring it, which would answer wrongly without a word).

    transformers 5 writes `rope_parameters` {"rope_type", "rope_theta"}; older configs a top-level `rope_theta` and
    `rope_scaling`. PaliGemma uses plain (default, unscaled) RoPE and an LM head tied to the token embedding."""
    for name in ("rope_parameters", "rope_scaling"):
        rope = text.get(name)
        if rope is not None and not isinstance(rope, dict):
            raise CheckpointError(f"{source}: text_config.{name} must be an object")
        kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{source}: text_config.{name} asks for rope_type {kind!r}; PaliGemma uses the "
                                  "default RoPE only — re-download config.json")
    theta = (text.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        if text.get("rope_theta") is not None and text["rope_theta"] != theta:
            raise CheckpointError(f"{source}: text_config gives rope_theta {text['rope_theta']} and "
                                  f"rope_parameters.rope_theta {theta}; keep one")
        text = {**text, "rope_theta": theta}
    if False in (cfg.get("tie_word_embeddings"), text.get("tie_word_embeddings")):
        raise CheckpointError(f"{source}: tie_word_embeddings is false, but PaliGemma's LM head is its token "
                              "embedding (a separate lm_head.weight is never read) — re-download config.json")
    return text


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
    text = _rope_and_head(cfg, text, source)
    text_type = text.get("model_type", "gemma")
    if text_type not in ("gemma", "gemma2"):
        raise CheckpointError(f"{source}: text_config.model_type {text_type!r} is not supported (gemma, gemma2)")
    eos = cfg.get("eos_token_id", 1)
    # The top-level hidden_size is stale in PaliGemma 2 configs: the projector width comes from projection_dim,
    # and failing that from the text width (never from top-level hidden_size).
    projection_dim = next((v for v in (cfg.get("projection_dim"), vision.get("projection_dim")) if v is not None),
                          None)
    try:
        # hidden_activation / hidden_act are ignored on purpose: every PaliGemma uses tanh-approximate GELU, and
        # old Gemma configs say "gelu" while meaning exactly that.
        text_cfg = GemmaConfig(**_pick(text, GemmaConfig, GEMMA2_DEFAULTS if text_type == "gemma2" else None))
        return PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**_pick(vision, SiglipVisionConfig)),
            text_config=text_cfg,
            projection_dim=text_cfg.hidden_size if projection_dim is None else projection_dim,
            image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 257152)),
            bos_token_id=cfg.get("bos_token_id", 2),
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos,  # one id: listed by __post_init__
        )
    except ConfigError as e:  # check_config, run by PaliGemmaConfig itself
        raise CheckpointError(f"{source}: {e}; fix the value or re-download config.json") from None


def load_config(model_path: str | os.PathLike) -> PaliGemmaConfig:
    """Read and parse `<model_path>/config.json`."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; --model_path must be a checkpoint directory with config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    except RecursionError:  # json's parser recurses per nesting level; a config is two levels deep
        raise CheckpointError(f"{path} is nested too deeply to be a config; re-download it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return config_from_dict(cfg, str(path))
