"""Write a full-size RANDOM-weight PaliGemma checkpoint in the Hugging Face hub layout (for load/memory benchmarks).

    python benchmarks/make_checkpoint.py OUT_DIR [--name paligemma-3b-224] [--dtype float32|bfloat16] [--seed 0]

The shapes are those of the named released architecture (`modeling_gemma.NAMED_CONFIGS`; paligemma-3b-224 is
2.923 B parameters, 11.7 GB in float32). OUT_DIR receives what `google/paligemma-3b-pt-224` (or, for
`paligemma2-*` names, `google/paligemma2-*-pt-*`) ships, minus real weights:

- a sparse `config.json` written like the hub's (fields the hub leaves out stay out);
- three shards `model-0000N-of-00003.safetensors` with the legacy key names (`vision_tower.vision_model.*`,
  `multi_modal_projector.linear.*`, `language_model.model.*`), no `lm_head`, plus `model.safetensors.index.json`.
  When the total needs exactly three 5 GB shards (paligemma-3b-* in float32) they are packed greedily up to 5 GB
  like `save_pretrained`; otherwise the bytes are split evenly into three;
- a synthetic tokenizer with the real id layout (`tokenizer.json`, `tokenizer_config.json`,
  `special_tokens_map.json`): pad 0, eos 1, bos 2, unk 3, "\\n" 108, "\\n\\n" 109, 256000 text pieces (a byte-fallback
  BPE over a small English word list, the rest filler), `<loc0000>`..`<loc1023>` = 256000..257023,
  `<seg000>`..`<seg127>` = 257024..257151 and `<image>` = 257152 as an added special token;
- `preprocessor_config.json` and `generation_config.json`.

Weights are drawn tensor by tensor (linear/conv/embedding weights and biases ~ N(0, 0.02), SigLIP LayerNorm weights 1
and biases 0, Gemma RMSNorm weights 0, i.e. identity; embedding rows from <image> up are zero), deterministically
from --seed; only one shard's tensors are in memory at a time. The result is checked: `utils.load_config` must give
exactly `PaliGemmaConfig.from_name(name)` and `utils.load_tokenizer` must accept the tokenizer. Progress and timings
go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for modeling_gemma / utils

from modeling_gemma import NAMED_CONFIGS, PaliGemmaConfig, PaliGemmaForConditionalGeneration  # noqa: E402

N_SHARDS = 3
HUB_MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's default max_shard_size="5GB"
STD = 0.02
N_TEXT = 256000  # Gemma text pieces
N_LOC, N_SEG = 1024, 128
IMAGE_TOKEN = "<image>"
IMAGE_ID = N_TEXT + N_LOC + N_SEG  # 257152
SPACE = "\u2581"  # SentencePiece's word-boundary marker
BYTE0 = 217  # first <0x00> byte-fallback piece (256 of them)

# Gemma's first ids: pad 0, eos 1, bos 2, unk 3, <mask> 4, <2mass> 5, [@BOS@] 6, <unused0..98> 7..105,
# <start_of_turn> 106, <end_of_turn> 107, "\n" 108, "\n\n" 109.
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_HEAD = (["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]
         + ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n"])
_SPECIAL_HEAD = {"<start_of_turn>", "<end_of_turn>"}

# Words that get whole-word pieces (each with and without the leading word marker); everything else is spelled
# from single characters, or from <0xNN> byte pieces for characters outside printable ASCII.
_WORDS = """
caption describe ocr answer question detect segment en es fr de it pt zh ja ko
a an the and or but of in on at to for with from by as is are was were be been has have had do does did not no
yes this that these those there here it its he she they we you i me my your his her their our what where when who
which why how many much one two three four five six seven eight nine ten some all any each every other more most
cat cats dog dogs cow cows horse bird birds person people man men woman women child children boy girl car cars
bus truck train plane airplane boat bike bicycle motorcycle street road city house building room table chair bed
sofa couch window door tree trees grass field beach sea ocean water sky cloud clouds sun snow mountain river lake
park food pizza cake fruit apple banana orange plate bowl cup glass bottle phone laptop computer book clock sign
red blue green yellow white black brown gray grey pink purple large small big little tall short old young new
left right top bottom front back middle near next behind over under inside outside up down standing sitting
walking running riding holding eating playing looking lying flying parked wearing photo picture image shows
day night morning evening sunny rainy wooden metal stone shirt hat jacket shoe shoes bag umbrella ball game
"""


# ---------------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------------

def hub_config(name: str, dtype: torch.dtype) -> dict:
    """A sparse config.json for `name`, written the way the hub's PaliGemma (1 or 2) configs are."""
    cfg = NAMED_CONFIGS[name]
    t, v = cfg.text_config, cfg.vision_config
    dt = str(dtype).removeprefix("torch.")
    n_img = v.num_image_tokens
    vision = {
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "model_type": "siglip_vision_model",
        "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
        "num_image_tokens": n_img, "patch_size": v.patch_size, "projection_dim": cfg.projection_dim,
    }
    if v.image_size != 224:  # the 224 configs leave it out
        vision["image_size"] = v.image_size
    if not t.is_gemma2:  # like google/paligemma-3b-pt-224 (transformers 4.41)
        text = {
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "model_type": "gemma",
            "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
            "num_image_tokens": n_img, "num_key_value_heads": t.num_key_value_heads, "torch_dtype": dt,
            "vocab_size": t.vocab_size,
        }
        vision.update(projector_hidden_act="gelu_fast", vision_use_head=False)
        top = {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": cfg.bos_token_id,
               "eos_token_id": cfg.eos_token_id[0], "hidden_size": t.hidden_size, "ignore_index": -100,
               "image_token_index": cfg.image_token_index, "model_type": "paligemma",
               "pad_token_id": cfg.pad_token_id, "projection_dim": cfg.projection_dim,
               "transformers_version": "4.41.0.dev0"}
    else:  # like google/paligemma2-3b-pt-448: Gemma 2 defaults (8 heads, head_dim 256, scalar 256) left out
        text = {
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "model_type": "gemma2",
            "num_hidden_layers": t.num_hidden_layers, "num_image_tokens": n_img,
            "num_key_value_heads": t.num_key_value_heads, "torch_dtype": dt, "vocab_size": t.vocab_size,
        }
        if t.num_attention_heads != 8:
            text["num_attention_heads"] = t.num_attention_heads
        if t.head_dim != 256:
            text["head_dim"] = t.head_dim
        if t.query_pre_attn_scalar != 256:
            text["query_pre_attn_scalar"] = t.query_pre_attn_scalar
        vision.update(torch_dtype=dt, vision_use_head=False)
        top = {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": cfg.bos_token_id,
               "eos_token_id": list(cfg.eos_token_id), "hidden_size": 2048,  # stale, as on the hub
               "image_token_index": cfg.image_token_index, "model_type": "paligemma",
               "pad_token_id": cfg.pad_token_id, "projection_dim": cfg.projection_dim,
               "transformers_version": "4.47.0.dev0"}
    out = dict(top, text_config=dict(sorted(text.items())), torch_dtype=dt, vision_config=dict(sorted(vision.items())))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------

def param_shapes(config: PaliGemmaConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape, in module order; our names are the hub's legacy keys. Built on meta (no memory)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def plan_shards(shapes: dict[str, torch.Size], itemsize: int) -> list[list[str]]:
    """Split the keys, in order, into N_SHARDS contiguous groups (see the module docstring for the rule)."""
    sizes = {k: math.prod(s) * itemsize for k, s in shapes.items()}
    total = sum(sizes.values())
    hub_like = math.ceil(total / HUB_MAX_SHARD_BYTES) == N_SHARDS
    groups: list[list[str]] = [[]]
    acc = 0  # bytes in the current group
    done = 0  # bytes in closed groups
    for k, s in sizes.items():
        if hub_like:
            full = acc + s > HUB_MAX_SHARD_BYTES
        else:
            full = done + acc + s / 2 > total * len(groups) / N_SHARDS
        if groups[-1] and full and len(groups) < N_SHARDS:
            groups.append([])
            done += acc
            acc = 0
        groups[-1].append(k)
        acc += s
    if len(groups) != N_SHARDS or not all(groups):
        raise RuntimeError(f"could not split {len(sizes)} tensors into {N_SHARDS} shards: {[len(g) for g in groups]}")
    return groups


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A finite, non-degenerate stand-in for the tensor `name` (see the module docstring)."""
    if "layer_norm" in name or "layernorm" in name:  # SigLIP LayerNorm
        return torch.ones(shape, dtype=dtype) if name.endswith(".weight") else torch.zeros(shape, dtype=dtype)
    if name.endswith("norm.weight"):  # Gemma RMSNorm, applied as (1 + w): zero is the identity
        return torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype).normal_(0.0, STD, generator=gen)
    if name.endswith("embed_tokens.weight"):
        out[IMAGE_ID:] = 0  # <image> and the padding rows are never looked up
    return out


def write_weights(out: Path, shapes: dict[str, torch.Size], dtype: torch.dtype, seed: int) -> int:
    """Write the shards and the index; returns the total tensor bytes."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = plan_shards(shapes, itemsize)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for n, keys in enumerate(groups, 1):
        t0 = time.perf_counter()
        fname = f"model-{n:05d}-of-{N_SHARDS:05d}.safetensors"
        tensors = {k: random_tensor(k, shapes[k], dtype, gen) for k in keys}
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
        t1 = time.perf_counter()
        tmp = out / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        del tensors
        weight_map.update(dict.fromkeys(keys, fname))
        total += nbytes
        print(f"  {fname}: {len(keys)} tensors, {nbytes / 1e9:.3f} GB (generate {t1 - t0:.1f}s, "
              f"write {time.perf_counter() - t1:.1f}s)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def build_vocab() -> tuple[dict[str, int], list[list[str]]]:
    """The 257152-piece vocabulary (real id layout) and the BPE merges that spell the word list."""
    pieces: list[str] = _SPECIALS + _HEAD
    assert pieces.index("\n") == 108 and len(pieces) == 110
    pieces += [f"<filler{i}>" for i in range(len(pieces), BYTE0)]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    pieces += [SPACE] + [chr(c) for c in range(33, 127)]
    merges: list[list[str]] = []
    known = set(pieces)
    words = _WORDS.split()
    words += [w.capitalize() for w in words]
    for word in dict.fromkeys(w for base in words for w in (SPACE + base, base)):
        for i in range(2, len(word) + 1):  # left-to-right chain: (prefix, next char) -> longer prefix
            new = word[:i]
            if new not in known:
                known.add(new)
                pieces.append(new)
                merges.append([word[:i - 1], word[i - 1]])
    for n in range(2, 32):  # runs of spaces, as Gemma has
        pieces.append(SPACE * n)
        merges.append([SPACE * (n - 1), SPACE])
    if len(pieces) > N_TEXT:
        raise RuntimeError(f"{len(pieces)} real pieces do not fit in {N_TEXT}")
    pieces += [f"{SPACE}filler{i}" for i in range(len(pieces), N_TEXT)]  # never produced by encoding
    pieces += [f"<loc{i:04d}>" for i in range(N_LOC)] + [f"<seg{i:03d}>" for i in range(N_SEG)]
    vocab = {p: i for i, p in enumerate(pieces)}
    assert len(vocab) == len(pieces) == IMAGE_ID, (len(vocab), len(pieces))
    return vocab, merges


def write_tokenizer(out: Path, add_bos: bool) -> None:
    """tokenizer.json (byte-fallback BPE like Gemma's), tokenizer_config.json and special_tokens_map.json."""
    vocab, merges = build_vocab()
    added = [{"id": vocab[p], **_added(p, True)} for p in _SPECIALS]
    added += [{"id": vocab[p], **_added(p, p in _SPECIAL_HEAD)} for p in _HEAD]
    added += [{"id": i, **_added(p, False)} for p, i in vocab.items() if i >= N_TEXT]  # <loc…>, <seg…>
    added.append({"id": IMAGE_ID, **_added(IMAGE_TOKEN, True)})
    bos = [{"SpecialToken": {"id": "<bos>", "type_id": 0}}] if add_bos else []
    bos1 = [{"SpecialToken": {"id": "<bos>", "type_id": 1}}] if add_bos else []
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}] + bos1 + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}} if add_bos else {},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    tok_cfg = {
        "add_bos_token": add_bos, "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [IMAGE_TOKEN], "bos_token": "<bos>", "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>", "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>",
        "processor_class": "PaliGemmaProcessor", "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    special = {"additional_special_tokens": [IMAGE_TOKEN], "bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def write_extras(out: Path, config: PaliGemmaConfig, transformers_version: str) -> None:
    """preprocessor_config.json (SiglipImageProcessor) and generation_config.json, as on the hub."""
    size = config.vision_config.image_size
    pre = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
           "image_seq_length": config.num_image_tokens, "image_std": [0.5, 0.5, 0.5],
           "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
           "size": {"height": size, "width": size}}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else config.eos_token_id
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id,
           "transformers_version": transformers_version}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# check + main
# ---------------------------------------------------------------------------------------------------------------

def verify(out: Path, name: str) -> None:
    """The written config parses to the named architecture and the tokenizer passes utils' checks."""
    import utils

    config = utils.load_config(out)
    if config != PaliGemmaConfig.from_name(name):
        raise RuntimeError(f"{out}/config.json parses to\n{config}\nnot\n{PaliGemmaConfig.from_name(name)}")
    tok = utils.load_tokenizer(out, config)
    got = tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "\n", "<loc0000>", "<seg127>", "<image>"])
    want = [0, 1, 2, 3, 108, N_TEXT, IMAGE_ID - 1, IMAGE_ID]
    if got != want:
        raise RuntimeError(f"tokenizer ids {got}, expected {want}")
    for text in ("caption en", "answer en Where is the cow standing?", "detect cat ; dog", "Zürich 3.14\n"):
        ids = tok(text, add_special_tokens=False).input_ids
        if not ids or tok.unk_token_id in ids or tok.decode(ids) != text:
            raise RuntimeError(f"tokenizer round trip failed for {text!r}: {ids} -> {tok.decode(ids)!r}")
    print(f"  verified: config == PaliGemmaConfig.from_name({name!r}); tokenizer len {len(tok)}, "
          f"'caption en' -> {tok('caption en').input_ids}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--name", default="paligemma-3b-224", choices=sorted(NAMED_CONFIGS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    config = PaliGemmaConfig.from_name(args.name)
    shapes = param_shapes(config)
    n_params = sum(math.prod(s) for s in shapes.values())
    print(f"{args.name}: {len(shapes)} tensors, {n_params / 1e9:.3f} B params, {args.dtype} -> {out}",
          file=sys.stderr, flush=True)
    cfg_json = hub_config(args.name, dtype)
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n", encoding="utf-8")
    write_extras(out, config, cfg_json["transformers_version"])
    t0 = time.perf_counter()
    write_tokenizer(out, add_bos=not config.text_config.is_gemma2)
    print(f"  tokenizer written in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    verify(out, args.name)
    print(f"  checked in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    total = write_weights(out, shapes, dtype, args.seed)
    t_w = time.perf_counter() - t0
    print(f"  weights: {total / 1e9:.3f} GB in {t_w:.1f}s ({total / 1e9 / t_w:.2f} GB/s)", file=sys.stderr)
    for p in sorted(out.iterdir()):
        print(f"  {p.stat().st_size:>15,d}  {p.name}", file=sys.stderr)
    print(f"done in {time.perf_counter() - t_start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
