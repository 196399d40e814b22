"""Tiny random-weight PaliGemma checkpoints laid out like the Hugging Face hub's.

``make_tiny_checkpoint(out_dir, ...)`` writes a directory that looks like
``google/paligemma-3b-pt-224`` (variant="pg1") or ``google/paligemma2-3b-pt-224``
(variant="pg2"): a sparse ``config.json``, three safetensors shards plus
``model.safetensors.index.json`` (key layout "legacy" = hub, "new" = ``model.*`` prefix,
"hf5" = what transformers 5.23 save_pretrained writes), a SentencePiece ``tokenizer.model`` with the real
id order (text pieces, then ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>``),
``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` with
``<image>`` as an added special token, ``preprocessor_config.json`` and
``generation_config.json``.  Everything is built offline and deterministically. The files are written by
``hub_layout.py`` (shared with ``benchmarks/make_checkpoint.py``); this module makes the tiny model's sizes and
weights, ``tiny_tokenizer.py`` its vocabulary.

Import it as ``from tiny_checkpoint import make_tiny_checkpoint`` (with ``tests/`` on
``sys.path``) or run ``python tests/tiny_checkpoint.py`` to build and check a few
variants against transformers.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from hub_layout import hub_config, plan_shards, write_config, write_preprocessor_config, write_shards
from tiny_tokenizer import (  # noqa: F401
    IMAGE_TOKEN,
    N_LOC,
    N_SEG,
    SPM_TEXT_PIECES,
    _build_tokenizer,
    tokenizer_info,
    write_tokenizer_files,
)

__all__ = [
    "make_tiny_checkpoint",
    "LAYOUTS",
    "tokenizer_info",
    "TEXT_HIDDEN",
    "VISION_HIDDEN",
]

# ----------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------
TEXT_HIDDEN = 64
TEXT_INTERMEDIATE = 128
PG1_LAYERS = 2
PG1_HEADS = 4  # head_dim stays at GemmaConfig's default 256 (absent from config.json)
PG2_LAYERS = 4  # layers 0, 2 sliding; 1, 3 global
PG2_HEADS = 8  # Gemma2Config default; absent from config.json like the hub 3B config
VISION_HIDDEN = 32
VISION_INTERMEDIATE = 64
VISION_LAYERS = 2
VISION_HEADS = 2
PATCH_SIZE = 14
DEFAULT_IMAGE_SIZE = 224

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def _sparse_config(variant, num_key_value_heads, image_size, dtype, sliding_window) -> dict:
    t = _build_tokenizer()
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}")
    num_image_tokens = (size // PATCH_SIZE) ** 2
    vision = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_attention_heads": VISION_HEADS,
        "num_hidden_layers": VISION_LAYERS,
        "num_image_tokens": num_image_tokens,
        "patch_size": PATCH_SIZE,
    }
    if image_size is not None:
        vision["image_size"] = size
    text = {
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_image_tokens": num_image_tokens,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": t["vocab_size"],
    }
    if variant == "pg1":
        text.update(num_attention_heads=PG1_HEADS, num_hidden_layers=PG1_LAYERS)
    elif variant == "pg2":  # heads (8) and head_dim (256) stay at Gemma 2's defaults, absent as on the hub
        text.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, num_hidden_layers=PG2_LAYERS,
                    sliding_window=sliding_window)
    else:
        raise ValueError(f"variant must be 'pg1' or 'pg2', got {variant!r}")
    return hub_config(gemma2=variant == "pg2", text=text, vision=vision, image_token_index=t["image_id"],
                      projection_dim=TEXT_HIDDEN, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------
_LINEAR_GAIN = 1.0  # std = gain / sqrt(fan_in): varied greedy output, yet float32 stays within ~1e-5 of float64
_EMBED_STD = 0.05
_POS_EMBED_STD = 0.5
_BIAS_STD = 0.05
_NORM_STD = 0.2
_FINAL_NORM_MEAN = 12.0  # Gemma final RMSNorm weight offset: scales the (tied) logits up


@torch.no_grad()
def _reinit_(model, seed: int, image_id: int) -> None:
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = p.shape
        if name.endswith("embed_tokens.weight"):
            new = torch.randn(shape, generator=g) * _EMBED_STD
            new[image_id:] = 0.0  # <image> row (never looked up) and padding rows
        elif name.endswith("position_embedding.weight"):
            new = torch.randn(shape, generator=g) * _POS_EMBED_STD
        elif "layer_norm" in name or "layernorm" in name:  # SigLIP LayerNorm (weight ~1, bias ~0)
            if name.endswith(".weight"):
                new = 1.0 + torch.randn(shape, generator=g) * _NORM_STD
            else:
                new = torch.randn(shape, generator=g) * _BIAS_STD
        elif p.ndim == 1 and "norm" in name:  # Gemma RMSNorm, used as (1 + w)
            new = torch.randn(shape, generator=g) * _NORM_STD
            if name.endswith("language_model.norm.weight"):
                new += _FINAL_NORM_MEAN
        elif name.endswith(".bias"):
            new = torch.randn(shape, generator=g) * _BIAS_STD
        elif p.ndim >= 2:  # Linear / Conv2d weights
            fan_in = math.prod(shape[1:])
            new = torch.randn(shape, generator=g) * (_LINEAR_GAIN / math.sqrt(fan_in))
        else:
            raise AssertionError(f"unhandled parameter {name} {tuple(shape)}")
        p.copy_(new.to(p.dtype))


def _build_model(config_dict: dict, seed: int, image_id: int):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = json.loads(json.dumps(config_dict))
    for d in (cfg, cfg["text_config"], cfg["vision_config"]):
        d.pop("torch_dtype", None)  # build in float32 (and avoid the torch_dtype deprecation warning)
    cfg = PaliGemmaConfig.from_dict(cfg)
    # transformers' own init draws from the global RNG: isolate it so callers' RNG state is untouched.
    # Every parameter is overwritten by _reinit_ anyway.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, image_id)
    return model


LAYOUTS = ("legacy", "new", "hf5")


def _layout_state_dict(model, layout: str, include_lm_head: bool = False) -> dict:
    """The model's weights under one of the on-disk naming schemes (see make_tiny_checkpoint)."""
    out = {}
    for k, v in model.state_dict().items():
        # transformers 5 in-memory names: model.vision_tower.{embeddings,encoder,post_layernorm}.*,
        # model.multi_modal_projector.linear.*, model.language_model.*, lm_head.weight (tied)
        if k == "lm_head.weight":
            if not include_lm_head:
                continue  # tied to the token embedding; neither the hub nor save_pretrained stores it
            nk = "language_model.lm_head.weight" if layout == "legacy" else "lm_head.weight"
        elif layout == "legacy":  # hub files
            nk = (k.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
                  .replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
                  .replace("model.language_model.", "language_model.model.", 1))
        elif layout == "new":  # transformers >= 4.52 save_pretrained / many hub fine-tunes
            nk = k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        elif layout == "hf5":  # exactly what transformers 5.23 save_pretrained writes (no "vision_model.")
            nk = (k.replace("model.vision_tower.", "vision_tower.", 1)
                  .replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
                  .replace("model.language_model.", "language_model.model.", 1))
        else:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        assert nk not in out, nk
        out[nk] = v
    return out


def _write_shards(out: pathlib.Path, sd: dict, dtype: torch.dtype, n_shards: int = 3) -> None:
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    groups = plan_shards({k: v.numel() * v.element_size() for k, v in tensors.items()}, n_shards)
    write_shards(out, groups, lambda keys: {k: tensors[k] for k in keys})


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------
def make_tiny_checkpoint(
    out_dir,
    *,
    variant: str = "pg1",
    layout: str = "legacy",
    num_key_value_heads: int = 1,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    sliding_window: int = 8,
    include_lm_head: bool = False,
    return_model: bool = False,
):
    """Write a tiny random PaliGemma checkpoint directory and return its path.

    variant: "pg1" (Gemma text model, like google/paligemma-3b-pt-224) or "pg2" (Gemma 2, like
        google/paligemma2-3b-pt-224; 4 layers, sliding on layers 0 and 2).
    layout: key names in the safetensors files --
        "legacy": the hub's: vision_tower.vision_model.*, multi_modal_projector.linear.*, language_model.model.*
        "new":    transformers >= 4.52 save_pretrained: model.vision_tower.vision_model.*,
                  model.multi_modal_projector.linear.*, model.language_model.*
        "hf5":    exactly what transformers 5.23 save_pretrained writes: vision_tower.* (NO "vision_model."),
                  multi_modal_projector.linear.*, language_model.model.*
        No lm_head tensor unless include_lm_head=True (then lm_head.weight, or language_model.lm_head.weight
        for "legacy"), a copy of the token embedding.
    image_size: None -> 224 and absent from config.json; else written to vision_config.image_size.
    dtype: storage dtype of the shards (config torch_dtype follows it). seed: weights are a pure function
        of (variant, num_key_value_heads, image_size, seed); the global torch RNG is left untouched.
    sliding_window: pg2 only (written to text_config).
    return_model: return (path, model) where model is the float32 transformers PaliGemmaForConditionalGeneration
        holding exactly the stored values (rounded through dtype).
    """
    out = pathlib.Path(out_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if variant not in ("pg1", "pg2"):
        raise ValueError(f"variant must be 'pg1' or 'pg2', got {variant!r}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = _sparse_config(variant, num_key_value_heads, image_size, dtype, sliding_window)
    tok = _build_tokenizer()
    model = _build_model(cfg, seed, tok["image_id"])
    if dtype != torch.float32:  # make the in-memory model hold exactly what is stored
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    _write_shards(out, _layout_state_dict(model, layout, include_lm_head), dtype)
    write_config(out, cfg)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    write_preprocessor_config(out, size, (size // PATCH_SIZE) ** 2)
    write_tokenizer_files(out, variant)
    return (out, model) if return_model else out


# ----------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------
def _test_image(size=64, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def _check(path: pathlib.Path, ref_model, prompt="caption en", n_new=32, verbose=True):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoProcessor, AutoTokenizer, PaliGemmaForConditionalGeneration

    cfg = json.loads((path / "config.json").read_text())
    variant = "pg2" if cfg["text_config"]["model_type"] == "gemma2" else "pg1"
    info = tokenizer_info()
    # -- tokenizer: transformers, raw tokenizers and sentencepiece agree
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.convert_tokens_to_ids([IMAGE_TOKEN, "<loc0005>", "<seg127>", "\n", "<eos>", "<bos>", "<pad>"])
    assert ids == [info["image_id"], info["text_n"] + 5, info["text_n"] + N_LOC + 127, 108, 1, 2, 0], ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert len(tok) == info["image_id"] + 1, len(tok)
    with_specials = tok("caption en").input_ids
    assert (with_specials[0] == 2) == (variant == "pg1"), with_specials  # pg1 adds BOS, pg2 does not
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for s in ["detect cat ; dog", "caption en", "answer en Where is the Cow standing? 42",
              "<loc0001><loc1023><seg000> cat ; dog", "a\n\nb\nc", "Zürich ☃ 3.14", "  two  spaces"]:
        a = tok(s, add_special_tokens=False).input_ids
        b = sp.encode(s)
        c = raw.encode(s, add_special_tokens=False).ids
        assert a == b == c, (s, a, b, c)
        assert tok.decode(a) == s == sp.decode(b), (tok.decode(a), sp.decode(b))
    # -- processor
    proc = AutoProcessor.from_pretrained(path)
    assert type(proc).__name__ == "PaliGemmaProcessor", type(proc)
    n_img = (cfg["vision_config"].get("image_size", 224) // PATCH_SIZE) ** 2
    inputs = proc(images=_test_image(), text=IMAGE_TOKEN + prompt, return_tensors="pt")
    iid = inputs["input_ids"][0].tolist()
    want = [info["image_id"]] * n_img + [2] + tok(prompt, add_special_tokens=False).input_ids + [108]
    assert iid == want, (iid[n_img - 2:], want[n_img - 2:])
    assert inputs["token_type_ids"].sum() == 0 and inputs["pixel_values"].shape[-1] == n_img ** 0.5 * PATCH_SIZE
    # -- model: loads cleanly and equals the in-memory model
    model, loading_info = PaliGemmaForConditionalGeneration.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in loading_info.items() if v}
    assert not bad, bad
    model.eval()
    with torch.no_grad():
        lg = model(**inputs).logits
        ref_lg = ref_model(**inputs).logits
    assert torch.isfinite(lg).all()
    max_diff = (lg - ref_lg).abs().max().item()
    assert max_diff == 0.0, max_diff
    # -- greedy generation varies
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    new = out[0, len(iid):].tolist()
    distinct = len(set(new))
    assert len(new) == n_new and distinct >= 8, new
    # -- prefix-LM masking in transformers 5.23: does the prompt attend bidirectionally?
    probe = inputs["input_ids"].clone()
    probe[0, -2] = 500  # change the last prompt token; do earlier positions' logits change?
    def _bidi(**kw):
        with torch.no_grad():
            a = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], **kw).logits
            b = model(input_ids=probe, pixel_values=inputs["pixel_values"], **kw).logits
        return (a[0, : n_img + 1] - b[0, : n_img + 1]).abs().max().item() > 0
    bidi_tt, bidi_none = _bidi(token_type_ids=inputs["token_type_ids"]), _bidi()
    assert bidi_tt
    if verbose:
        print(f"  from_pretrained: no missing/unexpected/mismatched keys; logits == in-memory model "
              f"(max|diff| {max_diff:.1e}); logits in [{lg.min().item():.1f}, {lg.max().item():.1f}]")
        print(f"  prompt bidirectional: with token_type_ids {bidi_tt}, without {bidi_none}")
        print(f"  greedy {n_new} tokens, {distinct} distinct: {tok.decode(new)!r}")
    return new


def _main():
    import argparse
    import tempfile
    import time

    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="write the checkpoints under this directory instead of a temp dir")
    args = ap.parse_args()
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    t0 = time.perf_counter()
    info = tokenizer_info()
    print(f"tokenizer trained in {time.perf_counter() - t0:.2f}s: {info}")
    cases = [
        ("pg1-legacy-mqa", dict(variant="pg1", layout="legacy", num_key_value_heads=1)),
        ("pg1-new-gqa", dict(variant="pg1", layout="new", num_key_value_heads=2)),
        ("pg1-legacy-112", dict(variant="pg1", layout="legacy", image_size=112)),
        ("pg1-hf5-lmhead", dict(variant="pg1", layout="hf5", include_lm_head=True, seed=1)),
        ("pg2-legacy", dict(variant="pg2", layout="legacy", num_key_value_heads=2)),
        ("pg2-new-bf16-112", dict(variant="pg2", layout="new", dtype=torch.bfloat16, image_size=112)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.keep or tmp)
        for name, kw in cases:
            t = time.perf_counter()
            path, model = make_tiny_checkpoint(root / name, return_model=True, **kw)
            dt = time.perf_counter() - t
            nbytes = sum(p.stat().st_size for p in path.iterdir())
            print(f"{name}: built in {dt:.2f}s ({nbytes / 1e6:.1f} MB, {len(list(path.iterdir()))} files)")
            _check(path, model)
    print("all checks passed")


if __name__ == "__main__":
    _main()
