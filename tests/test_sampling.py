"""Sampling: seeds reproduce, top-p stays inside the nucleus, temperature 0 / do_sample=False is greedy."""

import pytest
import torch
from conftest import random_image

from inference import generate_ids, make_processor, sample_next_token
from utils import load_hf_model


def test_greedy_when_not_sampling_or_zero_temperature():
    logits = torch.randn(4, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, do_sample=False, temperature=5.0), best)
    assert torch.equal(sample_next_token(logits, do_sample=True, temperature=0.0), best)


@pytest.mark.parametrize("temperature", [1e-46, 1e-300])
def test_temperature_below_float32s_range_is_greedy(temperature):
    """A valid temperature that rounds to 0 in float32 leaves only the best token (docs/errors.md), no NaN."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, True, temperature, 1.0, 0, g), logits.argmax(-1))


def test_top_p_never_leaves_the_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 40, generator=g) * 3
    top_p = 0.6
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    # Nucleus: the smallest prefix of the ranking whose mass reaches top_p.
    size = (sorted_p.cumsum(-1) < top_p).sum(-1) + 1
    nucleus = [set(order[b, : size[b]].tolist()) for b in range(8)]
    seen = [set() for _ in range(8)]
    for _ in range(300):
        tok = sample_next_token(logits, True, 1.0, top_p, 0, g)
        for b in range(8):
            assert tok[b].item() in nucleus[b]
            seen[b].add(tok[b].item())
    assert any(len(s) > 1 for s in seen)  # it samples, it is not argmax in disguise


def test_top_k_limits_choices():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=g)
    allowed = [set(logits[b].topk(3).indices.tolist()) for b in range(2)]
    for _ in range(200):
        tok = sample_next_token(logits, True, 2.0, 1.0, 3, g)
        assert all(tok[b].item() in allowed[b] for b in range(2))


@pytest.fixture(scope="module")
def tiny(ckpt):
    model, tok = load_hf_model(ckpt, "cpu")
    proc = make_processor(model, tok)
    return model, proc(text=["caption en"], images=[random_image(0)])


def test_seed_reproduces_and_differs(tiny):
    model, inp = tiny
    args = (model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"], 24)
    a = generate_ids(*args, do_sample=True, temperature=1.5, top_p=0.95, seed=123)
    b = generate_ids(*args, do_sample=True, temperature=1.5, top_p=0.95, seed=123)
    c = generate_ids(*args, do_sample=True, temperature=1.5, top_p=0.95, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_with_zero_temperature_is_greedy(tiny):
    model, inp = tiny
    args = (model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"], 16)
    assert torch.equal(generate_ids(*args, do_sample=True, temperature=0.0, seed=5), generate_ids(*args))


def test_sampling_without_a_seed_leaves_the_global_rng_alone(tiny):
    model, inp = tiny
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    generate_ids(model, inp["input_ids"], inp["pixel_values"], inp["attention_mask"], 2, do_sample=True)
    assert torch.equal(torch.rand(3), want)
