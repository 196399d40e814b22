"""The whole training path learns: a tiny model (PaliGemma 1, 112 px) trained on 8 (image, prompt, suffix) examples,
preset full, AdamW, until greedy generation (our KV-cache decoding) reproduces every suffix exactly."""

import torch
from conftest import random_image

from generation import generate, make_processor
from training import apply_preset
from utils import load_hf_model

SUFFIXES = ["a cat", "two dogs", "a red car", "blue sky", "a big tree", "an old house", "small boat", "green field"]
MAX_STEPS = 300


def test_tiny_model_overfits_eight_examples(checkpoint):
    torch.manual_seed(0)
    model, tok = load_hf_model(checkpoint("pg1-new-gqa-112"), "cpu", progress=False)
    processor = make_processor(model, tok)
    images = [random_image(i, (40, 40)) for i in range(len(SUFFIXES))]
    prompts = ["caption en"] * len(SUFFIXES)  # the same prompt: the image alone tells the examples apart
    batch = processor(text=prompts, images=images, suffix=SUFFIXES)
    model = apply_preset(model, "full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    answers: list[str] = []
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0 or loss.item() < 0.01:
            model.eval()
            with torch.no_grad():
                answers = generate(model, processor, prompts, images, max_new_tokens=8)
            if answers == SUFFIXES:
                break
    print(f"step {step}: loss {loss.item():.4f}, answers {answers}")
    assert answers == SUFFIXES
