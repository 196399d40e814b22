"""The tokenizer of the tiny test checkpoints: a small SentencePiece model in PaliGemma's real id order.

Text pieces (Gemma's low ids kept: pad 0, eos 1, bos 2, unk 3, "\\n" 108), then ``<loc0000>``..``<loc1023>`` and
``<seg000>``..``<seg127>`` as user-defined pieces, then ``<image>`` as an added special token. This module makes
the pieces; ``hub_layout.write_tokenizer`` writes them as ``tokenizer.model`` + ``tokenizer.json`` + configs, so
that ``AutoTokenizer.from_pretrained`` works offline.
"""

from __future__ import annotations

import io
import struct
import threading

# Gemma's first ids (kept as user-defined pieces), the <loc>/<seg> pieces and <image>: hub_layout.py.
from hub_layout import GEMMA_HEAD as _USER_DEFINED_HEAD
from hub_layout import IMAGE_TOKEN, LOC_TOKENS, N_LOC, N_SEG, SEG_TOKENS, write_tokenizer  # noqa: F401

SPM_TEXT_PIECES = 1000  # "text_n": pieces 0..999 are the Gemma-like text vocabulary

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


def _build_tokenizer():
    """Train the tiny SentencePiece model once per process; derive its BPE vocabulary and merges."""
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

        # ---- the BPE view of the same model, for tokenizer.json (tokenizers BPE with byte fallback)
        vocab = {sp.id_to_piece(i): i for i in range(n_pieces)}
        user_defined = set(_USER_DEFINED_HEAD + LOC_TOKENS + SEG_TOKENS)
        scores = {
            sp.id_to_piece(i): sp.get_score(i)
            for i in range(n_pieces)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
            or sp.id_to_piece(i) in user_defined)
        }
        _tok_cache.update(
            text_n=text_n,
            image_id=image_id,
            vocab_size=vocab_size,
            spm_proto=proto,
            vocab=vocab,
            merges=_generate_merges(vocab, scores),
        )
        return _tok_cache


def tokenizer_info() -> dict:
    """ids of the shared tiny tokenizer: text_n, image_id (= image_token_index), vocab_size (embedding rows)."""
    t = _build_tokenizer()
    return {"text_n": t["text_n"], "image_id": t["image_id"], "vocab_size": t["vocab_size"],
            "loc0": t["text_n"], "seg0": t["text_n"] + N_LOC, "newline": 108, "bos": 2, "eos": 1, "pad": 0}


def write_tokenizer_files(out, variant: str) -> None:
    """The tiny tokenizer's files in the hub layout; PaliGemma 1's ("pg1") adds <bos>, PaliGemma 2's does not."""
    t = _build_tokenizer()
    write_tokenizer(out, t["vocab"], t["merges"], t["image_id"], add_bos=variant == "pg1", spm_model=t["spm_proto"])
