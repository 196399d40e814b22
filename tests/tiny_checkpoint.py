"""Tiny random-weight PaliGemma checkpoints laid out like the Hugging Face hub's.

``make_tiny_checkpoint(out_dir, ...)`` writes a directory that looks like
``google/paligemma-3b-pt-224`` (variant="pg1") or ``google/paligemma2-3b-pt-224``
(variant="pg2"): a sparse ``config.json``, three safetensors shards plus
``model.safetensors.index.json`` (key layout "legacy" = hub, "new" = ``model.*`` prefix,
"hf5" = what transformers 5.23 save_pretrained writes), a SentencePiece ``tokenizer.model`` with the real
id order (text pieces, then ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>``),
``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` with
``<image>`` as an added special token, ``preprocessor_config.json`` and
``generation_config.json``.  Everything is built offline and deterministically.

Import it as ``from tiny_checkpoint import make_tiny_checkpoint`` (with ``tests/`` on
``sys.path``) or run ``python tests/tiny_checkpoint.py`` to build and check a few
variants against transformers.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import struct
import threading

import torch

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

SPM_TEXT_PIECES = 1000  # "text_n": pieces 0..999 are the Gemma-like text vocabulary
N_LOC = 1024
N_SEG = 128
TRANSFORMERS_VERSION_IN_CONFIG = {"pg1": "4.41.0.dev0", "pg2": "4.47.0.dev0"}

# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------
# Gemma's first ids: pad 0, eos 1, bos 2, unk 3, <mask> 4, <2mass> 5, [@BOS@] 6,
# <unused0..98> 7..105, <start_of_turn> 106, <end_of_turn> 107, "\n" 108, "\n\n" 109.
_USER_DEFINED_HEAD = (
    ["<mask>", "<2mass>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n"]
)
_SPECIAL_USER_DEFINED = {"<start_of_turn>", "<end_of_turn>"}
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(N_LOC)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(N_SEG)]
IMAGE_TOKEN = "<image>"

_CORPUS = """\
caption en
describe en
ocr
answer en what is in the image?
answer en where is the cow standing?
answer en how many people are there?
answer en what color is the car?
question en a red bus
detect cat
detect cat ; dog
detect person ; car ; bicycle
segment cat
segment the person on the left
a cow standing on the beach next to the ocean.
a cat sitting on a wooden table in the kitchen.
a dog running through the grass in a park.
two people riding bicycles down a city street.
a red car parked in front of a white house.
a group of children playing football on a sunny day.
an airplane flying over the mountains at sunset.
a bowl of fruit with apples, bananas and oranges.
a man holding an umbrella in the rain.
a woman reading a book on a bench under a tree.
a train arriving at the station in the morning.
a plate of pasta with tomato sauce and cheese.
a small boat floating on a calm lake.
the sky is blue and there are a few white clouds.
there are three birds sitting on the power line.
the building has many windows and a large green door.
the street sign says stop, and the light is red.
the picture shows a kitchen with a stove, a sink and a refrigerator.
the horse is eating hay in the field near the fence.
this is a photo of a snowy mountain with a clear sky.
the children are wearing school uniforms and carrying backpacks.
a close up of a pizza with pepperoni and olives.
a laptop computer on a desk next to a cup of coffee.
a yellow taxi driving on a busy road in new york.
an elephant walking along a dirt road in the savanna.
a giraffe eating leaves from the top of a tall tree.
a teddy bear sitting on a bed with a blue blanket.
a vase of flowers on a table by the window.
a skateboarder doing a trick on a ramp at the skate park.
a surfer riding a big wave in the ocean.
a clock tower in the middle of the town square.
the quick brown fox jumps over the lazy dog.
she sells sea shells by the sea shore.
how much wood would a woodchuck chuck if a woodchuck could chuck wood?
the number is 12345 and the code is 67890.
in 2024, about 3.5 million visitors came to the museum.
the temperature today is 21 degrees and it feels warm.
question: what is the name of the store? answer: the corner bakery.
it was the best of times, it was the worst of times.
all happy families are alike; each unhappy family is unhappy in its own way.
call me ishmael. some years ago, never mind how long precisely.
the old man and the sea is a short novel about a fisherman.
we went to the market and bought bread, milk, eggs and butter.
the meeting starts at nine o'clock and ends before lunch.
please turn left at the second traffic light and park near the gate.
this model reads an image and writes a short description of what it sees.
vision language models answer questions about pictures.
the table lists the name, age, and city of each person.
water boils at one hundred degrees celsius at sea level.
the cat and the dog are friends, and they sleep in the same basket.
a bright orange sunset over a quiet beach with palm trees.
a black and white photograph of an old bridge over a river.
several cars are waiting at the crossing while people walk by.
a person wearing a red jacket is hiking up a rocky trail.
the kitchen counter has a cutting board, a knife and some vegetables.
a baseball player swinging a bat at a ball during a game.
a tennis player serving the ball on a clay court.
a herd of sheep grazing on a green hillside.
a bathroom with a white sink, a mirror and a toilet.
a living room with a couch, a television and a lamp.
"""

_tok_lock = threading.Lock()
_tok_cache: dict = {}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _append_user_defined_pieces(model_proto: bytes, pieces) -> bytes:
    """Append USER_DEFINED pieces to a serialized sentencepiece ModelProto (no protobuf lib needed).

    ModelProto's top-level fields are all length-delimited; field 1 is ``repeated SentencePiece pieces``
    (SentencePiece: 1 piece, 2 score float, 3 type enum; USER_DEFINED = 4).
    """
    i = 0
    head, tail = bytearray(), bytearray()
    while i < len(model_proto):
        start = i
        tag, i = _read_varint(model_proto, i)
        if tag & 7 != 2:
            raise ValueError("unexpected wire type in sentencepiece model")
        length, i = _read_varint(model_proto, i)
        i += length
        (head if tag >> 3 == 1 else tail).extend(model_proto[start:i])
    for p in pieces:
        pb = p.encode("utf-8")
        msg = b"\x0a" + _varint(len(pb)) + pb + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(4)
        head += b"\x0a" + _varint(len(msg)) + msg
    return bytes(head + tail)


def _generate_merges(vocab: dict, scores: dict):
    """BPE merges from a sentencepiece BPE vocab, ordered by the merged piece's score (like transformers)."""
    merges = []
    for piece, score in scores.items():
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def _added_token(content, special):
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _build_tokenizer():
    """Train the tiny SentencePiece model once per process and derive all tokenizer files."""
    with _tok_lock:
        if _tok_cache:
            return _tok_cache
        import sentencepiece as spm

        sentences = [line for line in _CORPUS.splitlines() if line.strip()]
        # Also feed capitalised copies so upper-case letters get pieces, not only bytes.
        sentences += [s[:1].upper() + s[1:] for s in sentences]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            model_type="bpe",
            vocab_size=SPM_TEXT_PIECES,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=_USER_DEFINED_HEAD,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
        )
        text_n = SPM_TEXT_PIECES
        proto = _append_user_defined_pieces(buf.getvalue(), LOC_TOKENS + SEG_TOKENS)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        n_pieces = sp.get_piece_size()
        assert n_pieces == text_n + N_LOC + N_SEG, n_pieces
        assert sp.piece_to_id("<loc0000>") == text_n and sp.piece_to_id("<seg127>") == n_pieces - 1
        assert [sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()] == [0, 1, 2, 3]
        assert sp.piece_to_id("\n") == 108 and sp.piece_to_id("<end_of_turn>") == 107
        image_id = n_pieces
        vocab_size = (image_id + 1 + 63) // 64 * 64

        # ---- tokenizer.json (tokenizers BPE with byte fallback, like the hub's Gemma tokenizer.json)
        vocab = {sp.id_to_piece(i): i for i in range(n_pieces)}
        added_tokens = []  # control (special) + user-defined (non-special) pieces, then <image>
        user_defined = set(_USER_DEFINED_HEAD + LOC_TOKENS + SEG_TOKENS)
        for i in range(n_pieces):
            if sp.is_control(i) or sp.is_unknown(i):
                added_tokens.append({"id": i, **_added_token(sp.id_to_piece(i), True)})
            elif sp.id_to_piece(i) in user_defined:
                piece = sp.id_to_piece(i)
                added_tokens.append({"id": i, **_added_token(piece, piece in _SPECIAL_USER_DEFINED)})
        added_tokens.append({"id": image_id, **_added_token(IMAGE_TOKEN, True)})
        scores = {
            sp.id_to_piece(i): sp.get_score(i)
            for i in range(n_pieces)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
            or sp.id_to_piece(i) in user_defined)
        }
        merges = _generate_merges(vocab, scores)
        tokenizer_json = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added_tokens,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": None,
            "post_processor": None,  # filled in per variant by _post_processor()
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                ],
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": "<unk>",
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": True,
                "byte_fallback": True,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": merges,
            },
        }
        added_tokens_decoder = {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens
        }
        _tok_cache.update(
            text_n=text_n,
            image_id=image_id,
            vocab_size=vocab_size,
            spm_proto=proto,
            tokenizer_json=tokenizer_json,
            added_tokens_decoder=added_tokens_decoder,
        )
        return _tok_cache


def _post_processor(add_bos: bool):
    bos = [{"SpecialToken": {"id": "<bos>", "type_id": 0}}] if add_bos else []
    bos1 = [{"SpecialToken": {"id": "<bos>", "type_id": 1}}] if add_bos else []
    return {
        "type": "TemplateProcessing",
        "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}] + bos1 + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}} if add_bos else {},
    }


def tokenizer_info() -> dict:
    """ids of the shared tiny tokenizer: text_n, image_id (= image_token_index), vocab_size (embedding rows)."""
    t = _build_tokenizer()
    return {"text_n": t["text_n"], "image_id": t["image_id"], "vocab_size": t["vocab_size"],
            "loc0": t["text_n"], "seg0": t["text_n"] + N_LOC, "newline": 108, "bos": 2, "eos": 1, "pad": 0}


def _write_tokenizer_files(out: pathlib.Path, variant: str, image_size: int, image_seq_length: int):
    t = _build_tokenizer()
    (out / "tokenizer.model").write_bytes(t["spm_proto"])
    # transformers 5.23 follows tokenizer.json's post-processor (not add_bos_token), so both must agree.
    tj = dict(t["tokenizer_json"], post_processor=_post_processor(add_bos=variant == "pg1"))
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    special = {
        "additional_special_tokens": [_added_token(IMAGE_TOKEN, True)],
        "bos_token": _added_token("<bos>", True),
        "eos_token": _added_token("<eos>", True),
        "pad_token": _added_token("<pad>", True),
        "unk_token": _added_token("<unk>", True),
    }
    for v in special.values():
        for d in v if isinstance(v, list) else [v]:
            d.pop("special")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    tok_cfg = {
        # PaliGemma 1's tokenizer config adds BOS, PaliGemma 2's does not.
        "add_bos_token": variant == "pg1",
        "add_eos_token": False,
        "added_tokens_decoder": t["added_tokens_decoder"],
        "additional_special_tokens": [IMAGE_TOKEN],
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "PaliGemmaProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    pre = {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": image_seq_length,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sparse_config(variant, num_key_value_heads, image_size, dtype, sliding_window) -> dict:
    t = _build_tokenizer()
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}")
    num_image_tokens = (size // PATCH_SIZE) ** 2
    dt = _dtype_name(dtype)
    if variant == "pg1":
        text_config = {
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "model_type": "gemma",
            "num_attention_heads": PG1_HEADS,
            "num_hidden_layers": PG1_LAYERS,
            "num_image_tokens": num_image_tokens,
            "num_key_value_heads": num_key_value_heads,
            "torch_dtype": dt,
            "vocab_size": t["vocab_size"],
        }
        vision_config = {
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "model_type": "siglip_vision_model",
            "num_attention_heads": VISION_HEADS,
            "num_hidden_layers": VISION_LAYERS,
            "num_image_tokens": num_image_tokens,
            "patch_size": PATCH_SIZE,
            "projection_dim": TEXT_HIDDEN,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        }
        top = {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "bos_token_id": 2,
            "eos_token_id": 1,
            "hidden_size": TEXT_HIDDEN,
            "ignore_index": -100,
            "image_token_index": t["image_id"],
            "model_type": "paligemma",
            "pad_token_id": 0,
            "projection_dim": TEXT_HIDDEN,
        }
    elif variant == "pg2":
        text_config = {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "model_type": "gemma2",
            "num_hidden_layers": PG2_LAYERS,
            "num_image_tokens": num_image_tokens,
            "num_key_value_heads": num_key_value_heads,
            "sliding_window": sliding_window,
            "torch_dtype": dt,
            "vocab_size": t["vocab_size"],
        }
        vision_config = {
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "model_type": "siglip_vision_model",
            "num_attention_heads": VISION_HEADS,
            "num_hidden_layers": VISION_LAYERS,
            "num_image_tokens": num_image_tokens,
            "patch_size": PATCH_SIZE,
            "projection_dim": TEXT_HIDDEN,
            "torch_dtype": dt,
            "vision_use_head": False,
        }
        top = {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "bos_token_id": 2,
            "eos_token_id": [1, 107],
            "hidden_size": 2048,  # stale, as in the real PaliGemma 2 configs
            "image_token_index": t["image_id"],
            "model_type": "paligemma",
            "pad_token_id": 0,
            "projection_dim": TEXT_HIDDEN,
        }
    else:
        raise ValueError(f"variant must be 'pg1' or 'pg2', got {variant!r}")
    if image_size is not None:
        vision_config["image_size"] = size
    cfg = dict(top)
    cfg["text_config"] = dict(sorted(text_config.items()))
    cfg["torch_dtype"] = dt
    cfg["transformers_version"] = TRANSFORMERS_VERSION_IN_CONFIG[variant]
    cfg["vision_config"] = dict(sorted(vision_config.items()))
    return dict(sorted(cfg.items()))


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
    from safetensors.torch import save_file

    keys = list(sd)
    tensors = {k: sd[k].detach().to(dtype).contiguous() for k in keys}
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    total = sum(sizes)
    # Split in order into n contiguous groups of roughly equal byte size (each non-empty).
    groups, cur, acc, target = [], [], 0, total / n_shards
    for i, (k, s) in enumerate(zip(keys, sizes, strict=True)):
        remaining_keys = len(keys) - i
        remaining_groups = n_shards - len(groups)
        if cur and (acc + s / 2 > target * (len(groups) + 1) or remaining_keys < remaining_groups) \
                and len(groups) < n_shards - 1:
            groups.append(cur)
            cur = []
        cur.append(k)
        acc += s
    groups.append(cur)
    assert len(groups) == n_shards and all(groups), [len(g) for g in groups]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": 2, "eos_token_id": cfg["eos_token_id"], "pad_token_id": 0,
           "transformers_version": cfg["transformers_version"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    _write_tokenizer_files(out, variant, size, (size // PATCH_SIZE) ** 2)
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
