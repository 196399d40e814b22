"""Streaming: TextStream's pieces join to exactly what decode_text gives, multi-byte characters split across
byte-fallback tokens appear whole, and the CLI writes text while it is generated (--stream False: at the end)."""

import pytest
import torch
from conftest import random_image
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import generation
import inference
from inference import TextStream, decode_text, generate, make_processor
from utils import load_hf_model

EOS = [1]


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(str(ckpt))


def stream_all(tok, ids):
    s = TextStream(tok, EOS)
    pieces = [s.push(i) for i in ids]
    return pieces + [s.finish()]


def test_multibyte_characters_split_over_byte_tokens_appear_whole(tok):
    ids = tok.encode("€ 日本 a", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<0xE2>", "<0x82>", "<0xAC>"]  # "€" is three byte tokens
    pieces = stream_all(tok, ids)
    assert pieces[:4] == ["", "", "", "€ "]  # nothing until the byte run ends, then the whole character
    assert "".join(pieces) == "€ 日本 a" == decode_text(tok, torch.tensor(ids), EOS)
    assert not any("\ufffd" in p for p in pieces)


def test_a_byte_run_that_turns_invalid_later_is_not_emitted_early(tok):
    # tokenizers decode a run of byte tokens as a whole: E2 82 AC alone is "€", but E2 82 AC E2 is four U+FFFD.
    e2, x82, xac = tok.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>"])
    ids = [e2, x82, xac, e2, *tok.encode(" a", add_special_tokens=False)]
    assert tok.decode(ids[:3]) == "€" and tok.decode(ids[:4]) == "\ufffd" * 4
    assert "".join(stream_all(tok, ids)) == decode_text(tok, torch.tensor(ids), EOS)


def test_trailing_incomplete_character_and_eos(tok):
    a = tok.encode("cat", add_special_tokens=False)
    e2 = tok.convert_tokens_to_ids("<0xE2>")
    assert stream_all(tok, a + [e2])[-2:] == ["", "\ufffd"]
    ids = a + [1] + tok.encode("dog", add_special_tokens=False)  # EOS ends the answer, as in decode_text
    assert "".join(stream_all(tok, ids)) == "cat" == decode_text(tok, torch.tensor(ids), EOS)


@pytest.fixture(scope="module")
def id_pool(tok):
    bytes_ = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in (0xE2, 0x82, 0xAC, 0xE6, 0x97, 0xA5, 0xF0, 0x9F,
                                                                   0x90, 0x84, 0x41, 0xC3, 0xA9, 0x80, 0xFF)])
    text = tok.encode(" the cat sat\non a mat, said Zürich 3.14", add_special_tokens=False)
    info = tok.convert_tokens_to_ids(["<loc0000>", "<loc1023>", "<seg005>", "<bos>", "<pad>", "<unk>", "<eos>"])
    return sorted(set(bytes_ + text + info + [5, 6, 107, 108, 109]))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_joins_to_decode_text_for_any_ids(tok, id_pool, data):
    ids = data.draw(st.lists(st.sampled_from(id_pool), max_size=40))
    assert "".join(stream_all(tok, ids)) == decode_text(tok, torch.tensor(ids, dtype=torch.long), EOS)


def test_generate_on_text_streams_the_returned_answer(ckpt):
    model, tokenizer = load_hf_model(ckpt, "cpu")
    processor = make_processor(model, tokenizer)
    pieces, steps = [], []
    text = generate(model, processor, "caption en", random_image(7, (50, 40)), 30,
                    on_token=steps.append, on_text=pieces.append)[0]
    assert len(pieces) > 1 and "".join(pieces) == text
    assert text == generate(model, processor, ["caption en"], [random_image(7, (50, 40))], 30)[0]
    assert len(steps) >= len(pieces)
    with pytest.raises(ValueError, match="on_text streams one answer"):
        generate(model, processor, ["a", "b"], [random_image(1), random_image(2)], 2, on_text=print)


@pytest.mark.parametrize("stream", [True, False])
def test_cli_writes_text_while_generating(ckpt, tmp_path, monkeypatch, capsys, tok, stream):
    """Forced tokens (a "€" split over three byte tokens) through the real CLI; stdout read after every step."""
    forced = tok.encode("ok € done", add_special_tokens=False) + [1]
    seen = []

    def fake_generate_ids(model, input_ids, *args, on_token=None, **kwargs):
        for t in forced:
            if on_token is not None:
                on_token(torch.tensor([t]))
            seen.append(capsys.readouterr().out)
        return torch.tensor([forced])

    monkeypatch.setattr(generation, "generate_ids", fake_generate_ids)
    image = tmp_path / "x.png"
    random_image(0).save(image)
    inference.cli(["--model_path", str(ckpt), "--image_file_path", str(image), "--stream", str(stream)])
    out = "".join(seen) + capsys.readouterr().out
    assert out == "ok € done\n"
    so_far = ["".join(seen[:i + 1]) for i in range(len(seen))]  # stdout after each generated token
    if stream:
        e2 = forced.index(tok.convert_tokens_to_ids("<0xE2>"))
        assert so_far[e2 - 1] == "ok "  # text out as soon as it is final, before the answer is complete
        assert so_far[e2] == so_far[e2 + 1] == so_far[e2 + 2] == "ok "  # "€" is 3 byte tokens: held back ...
        assert so_far[e2 + 3].startswith("ok €")  # ... and written whole once the byte run ends
    else:
        assert so_far[-1] == ""  # all of it at the end
