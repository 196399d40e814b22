"""Hostile arguments to the Python API: the processor, the model's forward, generation's sampling values and the
loader each refuse a wrong type, shape, range or device with a ValueError (or TypeError) naming the argument at
the public function, instead of failing deep inside torch or answering garbage."""

import math

import numpy as np
import pytest
import torch
from conftest import random_image

from generation import SamplingConfig, generate, generate_ids, make_processor
from utils import load_hf_model, resolve_device_dtype


@pytest.fixture(scope="module")
def tiny(ckpt):
    model, tokenizer = load_hf_model(ckpt, progress=False)
    return model, make_processor(model, tokenizer)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(text="x", images=np.zeros((4, 4, 3), np.uint8)), "images must be a PIL.Image.Image"),
    (dict(text="x", images=torch.zeros(3, 4, 4)), "images must be a PIL.Image.Image"),
    (dict(text="x", images="photo.jpg"), "PIL.Image.open"),
    (dict(text="x", images=None), "images must be"),
    (dict(text=None, images="IMAGE"), "text must be"),
    (dict(text=["a", 3], images="IMAGES"), "text must be"),
    (dict(text="see <image>", images="IMAGE"), "<image>"),
    (dict(text="x", images="IMAGE", suffix="a <image> dog"), "suffix contains the text <image>"),
    (dict(text="x", images="IMAGE", suffix="a \ud800 dog"), "suffix holds bytes that are not valid UTF-8"),
])
def test_processor_arguments(tiny, kwargs, needle):
    image = random_image(1)
    kwargs = {k: {"IMAGE": image, "IMAGES": [image, image]}.get(v, v) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=needle.replace("(", r"\(").replace(".", r"\.")):
        tiny[1](**kwargs)


def test_model_arguments(tiny):
    model, processor = tiny
    inputs = processor(text="x", images=random_image(1))
    ids, pv = inputs["input_ids"], inputs["pixel_values"]
    vocab = model.config.text_config.vocab_size
    cases = [
        (dict(input_ids=ids.float(), pixel_values=pv), TypeError, "input_ids must be an integer tensor"),
        (dict(input_ids=ids[0], pixel_values=pv), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=ids.masked_fill(ids == 2, vocab + 5), pixel_values=pv), ValueError, "outside"),
        (dict(input_ids=ids.masked_fill(ids == 2, -1), pixel_values=pv), ValueError, "id -1"),
        (dict(input_ids=ids, pixel_values=pv, attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
        (dict(input_ids=ids, pixel_values=pv[0]), ValueError, "pixel_values must have shape"),
        (dict(input_ids=ids, pixel_values=pv[..., :112, :112]), ValueError, "pixel_values must have shape"),
        (dict(input_ids=ids, pixel_values=pv, kv_cache=model.new_kv_cache(2, 400),
              input_pos=torch.arange(ids.shape[1])), ValueError, "batch size 2"),
        (dict(input_ids=ids, pixel_values=pv, kv_cache=model.new_kv_cache(1, 10),
              input_pos=torch.arange(ids.shape[1])), ValueError, "longer cache"),
        # labels alone would train the suffix bidirectionally: every position sees the token it predicts
        (dict(input_ids=ids, pixel_values=pv, labels=ids), ValueError, "labels need token_type_ids"),
    ]
    for kwargs, error, needle in cases:
        with pytest.raises(error, match=needle):
            model(**kwargs)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(top_p=0), "top_p"), (dict(top_p=2), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(temperature=math.inf), "temperature"), (dict(seed=-1), "seed"),
])
def test_sampling_arguments(tiny, kwargs, needle):
    model, processor = tiny
    with pytest.raises(ValueError, match=needle):
        generate(model, processor, "x", random_image(1), **kwargs)
    inputs = processor(text="x", images=random_image(1))
    with pytest.raises(ValueError, match=needle):
        generate_ids(model, inputs["input_ids"], inputs["pixel_values"], **kwargs)
    with pytest.raises(ValueError, match=needle):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(dtype=torch.int8), "dtype torch.int8 is not supported"), (dict(dtype="int8"), "unknown dtype"),
    (dict(device="meta"), "device 'meta' is not supported"),
])
def test_load_arguments(ckpt, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        load_hf_model(ckpt, progress=False, **kwargs)
    with pytest.raises(ValueError, match=needle):
        resolve_device_dtype(kwargs.get("device", "cpu"), kwargs.get("dtype"))


def test_right_padding_is_refused_by_generation(tiny):
    """The first new token is read at the last position: a right-padded row would continue from a pad."""
    model, processor = tiny
    inputs = processor(text=["x", "a longer prompt"], images=[random_image(1), random_image(2)])
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    assert not mask[0].all(), "the short row must be padded"
    shift = int((mask[0] == 0).sum())
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[0], right_mask[0] = ids[0].roll(-shift), mask[0].roll(-shift)  # the same row, padded on the right
    with pytest.raises(ValueError, match="LEFT padding"):
        generate_ids(model, right_ids, inputs["pixel_values"], right_mask, max_new_tokens=2)
