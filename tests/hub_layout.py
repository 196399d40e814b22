"""The Hugging Face hub's file layout of a PaliGemma checkpoint, written in one place.

A directory like google/paligemma-3b-pt-224 (PaliGemma 1) or google/paligemma2-3b-pt-224 (PaliGemma 2):

- `config.json`: sparse, the way the hub's files are (fields left at transformers' defaults are mostly absent);
- `model-0000N-of-0000M.safetensors` shards and `model.safetensors.index.json`;
- `tokenizer.json` (byte-fallback BPE, Gemma's special ids), `tokenizer_config.json`, `special_tokens_map.json`,
  and `tokenizer.model` where there is a SentencePiece model;
- `preprocessor_config.json` (SiglipImageProcessor) and `generation_config.json`.

Two writers use it, with their own contents: `tests/tiny_checkpoint.py` (tiny random models and a small trained
SentencePiece vocabulary, the fixtures of the test suite) and `benchmarks/make_checkpoint.py` (full-size random
weights drawn shard by shard, a synthetic 257152-piece vocabulary, for the load and memory benchmarks). This
module decides what the files are called and what they hold; the callers decide the sizes, weights and pieces.

It lives in tests/, and the benchmark imports it from here, because it is test support: every test run writes
checkpoints through it and loads them both with our loader and with transformers, so a layout mistake fails CI,
which a copy among the benchmarks (run by hand) would not. It needs only torch, safetensors and the standard
library, and the shard writer it shares with the library's own checkpoint saving (hub_writer.py, used by
finetune.py): nothing of the model code under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for hub_writer when run as a script
from hub_writer import HUB_MAX_SHARD_BYTES, plan_shards, write_json, write_shards  # noqa: E402, F401 — re-exported

# Gemma's first ids: pad 0, eos 1, bos 2, unk 3, <mask> 4, <2mass> 5, [@BOS@] 6, <unused0..98> 7..105,
# <start_of_turn> 106, <end_of_turn> 107, "\n" 108, "\n\n" 109. Both vocabularies keep them.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA_HEAD = (["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]
              + ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n"])
SPECIAL_HEAD = {"<start_of_turn>", "<end_of_turn>"}  # the only head pieces marked special
N_LOC, N_SEG = 1024, 128  # <loc0000>..<loc1023>, <seg000>..<seg127>: right after the text pieces
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(N_LOC)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(N_SEG)]
IMAGE_TOKEN = "<image>"  # an added special token, one id past the last <seg>
BOS, EOS, PAD = 2, 1, 0

# The transformers version each family's hub config.json was written by.
TRANSFORMERS_VERSION = {"pg1": "4.41.0.dev0", "pg2": "4.47.0.dev0"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# config.json, generation_config.json, preprocessor_config.json
# ---------------------------------------------------------------------------------------------------------------

def hub_config(*, gemma2: bool, text: dict, vision: dict, image_token_index: int, projection_dim: int,
               dtype: torch.dtype) -> dict:
    """config.json as the hub has it for PaliGemma 1 (gemma2=False, like transformers 4.41 wrote it) or 2 (4.47).

    text / vision: the size fields to write (hidden_size, intermediate_size, num_hidden_layers,
    num_key_value_heads, vocab_size, ...; vision_config.image_size only where it is not 224); each family's fixed
    fields (model types, activations, dtype, token ids, PaliGemma 2's stale top-level hidden_size) are added here.
    """
    dt = dtype_name(dtype)
    vision = dict(vision, model_type="siglip_vision_model", projection_dim=projection_dim, vision_use_head=False)
    top = {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": BOS,
           "image_token_index": image_token_index, "model_type": "paligemma", "pad_token_id": PAD,
           "projection_dim": projection_dim, "torch_dtype": dt}
    if not gemma2:
        text = dict(text, model_type="gemma", torch_dtype=dt)
        vision["projector_hidden_act"] = "gelu_fast"  # unused, but the PaliGemma 1 file has it
        top.update(eos_token_id=EOS, hidden_size=text["hidden_size"], ignore_index=-100,
                   transformers_version=TRANSFORMERS_VERSION["pg1"])
    else:
        text = dict(text, hidden_activation="gelu_pytorch_tanh", model_type="gemma2", torch_dtype=dt)
        vision["torch_dtype"] = dt
        top.update(eos_token_id=[EOS, 107], hidden_size=2048,  # stale, as in the real PaliGemma 2 configs
                   transformers_version=TRANSFORMERS_VERSION["pg2"])
    out = dict(top, text_config=dict(sorted(text.items())), vision_config=dict(sorted(vision.items())))
    return dict(sorted(out.items()))


def write_config(out: Path, config: dict) -> None:
    """config.json, and generation_config.json with the same token ids."""
    write_json(out / "config.json", config)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"], "transformers_version": config["transformers_version"]}
    write_json(out / "generation_config.json", gen)


def write_preprocessor_config(out: Path, image_size: int, num_image_tokens: int) -> None:
    """preprocessor_config.json: SiglipImageProcessor, bicubic resize to image_size², [-1, 1] normalisation."""
    pre = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
           "image_seq_length": num_image_tokens, "image_std": [0.5, 0.5, 0.5],
           "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
           "size": {"height": image_size, "width": image_size}}
    write_json(out / "preprocessor_config.json", pre)


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------

def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def added_tokens(vocab: dict[str, int], image_id: int) -> list[dict]:
    """tokenizer.json's added tokens, in id order: Gemma's four specials and the head pieces (ids 0..109), the
    <loc>/<seg> pieces (not special), then <image> (special) at image_id."""
    added = [{"id": vocab[p], **_added(p, True)} for p in GEMMA_SPECIALS]
    added += [{"id": vocab[p], **_added(p, p in SPECIAL_HEAD)} for p in GEMMA_HEAD]
    added += [{"id": vocab[p], **_added(p, False)} for p in LOC_TOKENS + SEG_TOKENS]
    added.append({"id": image_id, **_added(IMAGE_TOKEN, True)})
    return added


def _post_processor(add_bos: bool) -> dict:
    bos = [{"SpecialToken": {"id": "<bos>", "type_id": 0}}] if add_bos else []
    bos1 = [{"SpecialToken": {"id": "<bos>", "type_id": 1}}] if add_bos else []
    return {
        "type": "TemplateProcessing",
        "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}] + bos1 + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [BOS], "tokens": ["<bos>"]}} if add_bos else {},
    }


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[list[str]], image_id: int, add_bos: bool,
                    spm_model: bytes | None = None) -> None:
    """tokenizer.json (byte-fallback BPE over vocab/merges, like the hub's Gemma tokenizer.json),
    tokenizer_config.json and special_tokens_map.json; tokenizer.model too when spm_model is given.

    add_bos: PaliGemma 1's tokenizer adds <bos>, PaliGemma 2's does not. transformers 5 follows tokenizer.json's
    post-processor (not add_bos_token), so both are written from it."""
    added = added_tokens(vocab, image_id)
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": _post_processor(add_bos),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    write_json(out / "tokenizer.json", tokenizer_json, indent=None, newline=False)
    tok_cfg = {
        "add_bos_token": add_bos, "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [IMAGE_TOKEN], "bos_token": "<bos>", "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>", "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>",
        "processor_class": "PaliGemmaProcessor", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    write_json(out / "tokenizer_config.json", tok_cfg, newline=False)

    def token(content: str) -> dict:
        return {k: v for k, v in _added(content, True).items() if k != "special"}

    special = {"additional_special_tokens": [token(IMAGE_TOKEN)], "bos_token": token("<bos>"),
               "eos_token": token("<eos>"), "pad_token": token("<pad>"), "unk_token": token("<unk>")}
    write_json(out / "special_tokens_map.json", special, newline=False)
    if spm_model is not None:
        (out / "tokenizer.model").write_bytes(spm_model)
