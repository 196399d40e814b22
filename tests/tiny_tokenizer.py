"""The tokenizer of the tiny test checkpoints: a small SentencePiece model in PaliGemma's real id order.

Text pieces (Gemma's low ids kept: pad 0, eos 1, bos 2, unk 3, "\\n" 108), then ``<loc0000>``..``<loc1023>`` and
``<seg000>``..``<seg127>`` as user-defined pieces, then ``<image>`` as an added special token, written as
``tokenizer.model`` + ``tokenizer.json`` + configs so ``AutoTokenizer.from_pretrained`` works offline.
"""

from __future__ import annotations

import io
import json
import pathlib
import struct
import threading

SPM_TEXT_PIECES = 1000  # "text_n": pieces 0..999 are the Gemma-like text vocabulary
N_LOC = 1024
N_SEG = 128

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
