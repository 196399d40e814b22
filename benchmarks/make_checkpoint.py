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

The files are written by `tests/hub_layout.py`, the writer the test suite's tiny checkpoints use too (so the layout
is defined, and tested on every test run, in one place); this script makes the full-size shapes, weights and
vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the repo root (modeling_gemma, utils), tests/ (hub_layout)

import hub_layout  # noqa: E402
from hub_layout import GEMMA_HEAD, GEMMA_SPECIALS, N_LOC, N_SEG  # noqa: E402

from modeling_gemma import NAMED_CONFIGS, PaliGemmaConfig, PaliGemmaForConditionalGeneration  # noqa: E402

N_SHARDS = 3
STD = 0.02
N_TEXT = 256000  # Gemma text pieces
IMAGE_ID = N_TEXT + N_LOC + N_SEG  # 257152
SPACE = "\u2581"  # SentencePiece's word-boundary marker
BYTE0 = 217  # first <0x00> byte-fallback piece (256 of them)

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
    n_img = v.num_image_tokens
    vision = {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
              "num_image_tokens": n_img, "patch_size": v.patch_size}
    if v.image_size != 224:  # the 224 configs leave it out
        vision["image_size"] = v.image_size
    text = {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_image_tokens": n_img,
            "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size}
    if not t.is_gemma2:  # like google/paligemma-3b-pt-224 (transformers 4.41)
        text["num_attention_heads"] = t.num_attention_heads
    else:  # like google/paligemma2-3b-pt-448: Gemma 2 defaults (8 heads, head_dim 256, scalar 256) left out
        if t.num_attention_heads != 8:
            text["num_attention_heads"] = t.num_attention_heads
        if t.head_dim != 256:
            text["head_dim"] = t.head_dim
        if t.query_pre_attn_scalar != 256:
            text["query_pre_attn_scalar"] = t.query_pre_attn_scalar
    return hub_layout.hub_config(gemma2=t.is_gemma2, text=text, vision=vision, image_token_index=cfg.image_token_index,
                                   projection_dim=cfg.projection_dim, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------

def param_shapes(config: PaliGemmaConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape, in module order; our names are the hub's legacy keys. Built on meta (no memory)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items()}


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
    """Write the shards and the index, drawing one shard's tensors at a time; returns the total tensor bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = hub_layout.plan_shards({k: math.prod(s) * itemsize for k, s in shapes.items()}, N_SHARDS)
    gen = torch.Generator().manual_seed(seed)
    return hub_layout.write_shards(out, groups, lambda keys: {k: random_tensor(k, shapes[k], dtype, gen) for k in keys},
                                   log=hub_layout.log_stderr)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------

def build_vocab() -> tuple[dict[str, int], list[list[str]]]:
    """The 257152-piece vocabulary (real id layout) and the BPE merges that spell the word list."""
    pieces: list[str] = GEMMA_SPECIALS + GEMMA_HEAD
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
    hub_layout.write_config(out, hub_config(args.name, dtype))  # and generation_config.json
    hub_layout.write_preprocessor_config(out, config.vision_config.image_size, config.num_image_tokens)
    t0 = time.perf_counter()
    vocab, merges = build_vocab()
    hub_layout.write_tokenizer(out, vocab, merges, IMAGE_ID, add_bos=not config.text_config.is_gemma2)
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
