"""PaliGemmaProcessor vs transformers' PaliGemmaProcessor built from the same tokenizer files, and fuzzed."""

import numpy as np
import pytest
import torch
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import hf_processor

from inference import make_processor
from processing_paligemma import PaliGemmaProcessor, ProcessorError, to_rgb
from utils import load_config, load_tokenizer


@pytest.fixture(scope="module", params=["pg1-legacy-mqa-224", "pg1-new-gqa-112"])
def processors(request, checkpoint):
    path = checkpoint(request.param)
    cfg = load_config(path)
    ours = PaliGemmaProcessor(load_tokenizer(path, cfg), cfg.num_image_tokens, cfg.vision_config.image_size)
    return ours, hf_processor(path), cfg


def _palette_with_transparency() -> Image.Image:
    im = random_image(5, (50, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 3
    return im


IMAGES = {
    "RGB wide": lambda: random_image(1, (120, 40)),
    "RGB tall": lambda: random_image(2, (20, 200)),
    "RGBA": lambda: random_image(3, (64, 64), "RGBA").copy(),
    "LA": lambda: random_image(4, (31, 47), "LA"),
    "L": lambda: random_image(6, (300, 300), "L"),
    "P": lambda: random_image(7, (45, 45), "P"),
    "P+transparency": _palette_with_transparency,
    "CMYK": lambda: random_image(8, (80, 60), "CMYK"),
    "1x1": lambda: random_image(9, (1, 1)),
}


def _with_alpha(im: Image.Image) -> Image.Image:
    """Give RGBA/LA images a real alpha gradient so the white compositing is tested, not a no-op."""
    if im.mode in ("RGBA", "LA"):
        alpha = Image.linear_gradient("L").resize(im.size)
        im.putalpha(alpha)
    return im


@pytest.mark.parametrize("kind", list(IMAGES))
def test_pixels_and_ids_match_transformers(processors, kind):
    ours, ref, cfg = processors
    img = _with_alpha(IMAGES[kind]())
    prompts = ["caption en"]
    a = ours(text=prompts, images=[img])
    b = ref(text=prompts, images=[img], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["pixel_values"].shape == (1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    assert (a["pixel_values"] - b["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("prompt", ["", "caption en", "answer en what colour is the cat? ",
                                    "detect cat ; dog", "<loc0005> x", "question en café 日本 🐄"])
def test_prompt_ids_match_transformers(processors, prompt):
    ours, ref, cfg = processors
    img = random_image(0)
    a = ours(text=[prompt], images=[img])["input_ids"]
    b = ref(text=[prompt], images=[img], return_tensors="pt")["input_ids"]
    assert a.tolist() == b.tolist()
    n = cfg.num_image_tokens
    assert a[0, :n].eq(cfg.image_token_index).all() and a[0, n] == cfg.bos_token_id


def test_trailing_newline_is_not_doubled(processors):
    # transformers appends "\n" unconditionally ("ocr\n" -> "\n\n", another token); the prompt format wants one.
    ours, ref, _ = processors
    img = random_image(0)
    a = ours(text=["ocr\n"], images=[img])["input_ids"]
    b = ref(text=["ocr"], images=[img], return_tensors="pt")["input_ids"]
    assert a.tolist() == b.tolist()


def test_batch_left_padding_matches_transformers(processors):
    ours, ref, _ = processors
    prompts = ["caption en", "answer en how many dogs are sitting on the red sofa?"]
    imgs = [random_image(1), random_image(2)]
    a = ours(text=prompts, images=imgs)
    ref.tokenizer.padding_side = "left"
    b = ref(text=prompts, images=imgs, return_tensors="pt", padding="longest")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["attention_mask"][0, 0] == 0 and a["attention_mask"][:, -1].eq(1).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    # Pillow's I;16 -> RGB conversion clips at 255 (most of a 16-bit photo turns white); we scale to 8 bits.
    arr = np.array([[0, 256 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    rgb = np.asarray(to_rgb(img))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


def test_bad_input_raises_processor_error(processors):
    ours, _, _ = processors
    with pytest.raises(ProcessorError, match="prompts for"):
        ours(text=["a", "b"], images=[random_image(0)])
    with pytest.raises(ProcessorError, match="PIL"):
        ours(text=["a"], images=[np.zeros((4, 4, 3))])


def test_make_processor_follows_config(checkpoint):
    from utils import load_hf_model

    model, tok = load_hf_model(checkpoint("pg1-new-gqa-112"), "cpu")
    proc = make_processor(model, tok)
    assert (proc.image_size, proc.num_image_tokens) == (112, 64)


# ---------------------------------------------------------------------------------------------------------------
# fuzz: any PIL image (every mode, empty ones too) and any prompt give pixels and ids or a ProcessorError
# ---------------------------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16"]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(0, 48)), draw(st.integers(0, 48))
    if w == 0 or h == 0:
        return Image.new(mode, (w, h))
    arr = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        im = Image.fromarray(arr).convert(mode)
    except ValueError:
        im = Image.new(mode, (w, h))
    if mode == "P" and draw(st.booleans()):
        im.info["transparency"] = 0
    return im


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers import AutoTokenizer

    return PaliGemmaProcessor(AutoTokenizer.from_pretrained(str(ckpt)), 16, 56)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=pil_images(), prompt=st.text(max_size=40))
def test_processor_fuzz_raises_only_processor_error(processor, image, prompt):
    try:
        out = processor(text=[prompt], images=[image])
    except ProcessorError:
        assert image.width == 0 or image.height == 0 or image.mode in ("LAB", "HSV")
        return
    assert out["pixel_values"].shape == (1, 3, 56, 56) and torch.isfinite(out["pixel_values"]).all()
    assert out["input_ids"].shape[1] >= 16 + 2
