"""processor(..., suffix=...) for fine-tuning: ids, masks, token_type_ids and labels equal to transformers'
PaliGemmaProcessor(..., suffix=...) built from the same tokenizer files (left padding, rows of different lengths)."""

import pytest
import torch
from conftest import random_image
from reference import hf_processor

from processing_paligemma import PaliGemmaProcessor, ProcessorError
from utils import load_config, load_tokenizer

CASES = {
    "different lengths": (["caption en", "answer en what is on the beach?"], ["a cat", "two dogs"]),
    "suffix longer than the other row": (["caption en", "ocr"], ["a", "a cow standing on the sandy beach at dusk"]),
    "locations and unicode": (["detect cat", "caption es"], ["<loc0010><loc0020><loc0500><loc0600> cat", "vaca 🐄"]),
    "one row": (["describe en"], ["a small red house"]),
}


@pytest.fixture(scope="module", params=["pg1-legacy-mqa-224", "pg2-legacy-gqa-224"])
def processors(request, checkpoint):
    path = checkpoint(request.param)
    cfg = load_config(path)
    ours = PaliGemmaProcessor(load_tokenizer(path, cfg), cfg.num_image_tokens, cfg.vision_config.image_size)
    return ours, hf_processor(path)


@pytest.mark.parametrize("case", list(CASES))
def test_suffix_batch_matches_transformers(processors, case):
    ours, ref = processors
    prompts, suffixes = CASES[case]
    imgs = [random_image(i) for i in range(len(prompts))]
    a = ours(text=prompts, images=imgs, suffix=suffixes)
    b = ref(text=prompts, images=imgs, suffix=suffixes, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert a[key].tolist() == b[key].tolist(), key
    assert (a["pixel_values"] - b["pixel_values"]).abs().max().item() <= 1e-6
    # What the fields mean, independently of transformers: every row ends with EOS, its suffix is labelled.
    eos = ours.tokenizer.eos_token_id
    assert (a["input_ids"][:, -1] == eos).all() and (a["labels"][:, -1] == eos).all()
    n_labelled = (a["labels"] != -100).sum(1).tolist()
    assert n_labelled == [len(ours.suffix_ids(s)) for s in suffixes]


def test_without_suffix_nothing_changes(processors):
    ours, _ = processors
    out = ours(text=["caption en"], images=[random_image(0)])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}


@pytest.mark.parametrize("suffix, message", [(["a", "b"], "2 suffixes for 1 prompts"),
                                             ([3], "suffix must be a target string or a list of them, got a list")])
def test_bad_suffix_is_a_clear_error(processors, suffix, message):
    ours, _ = processors
    with pytest.raises(ProcessorError, match=message):
        ours(text=["caption en"], images=[random_image(0)], suffix=suffix)


def test_labels_are_token_type_one(processors):
    ours, _ = processors
    out = ours(text=["caption en", "ocr"], images=[random_image(0), random_image(1)], suffix=["x", "a b c"])
    assert torch.equal(out["labels"] != -100, out["token_type_ids"] == 1)
    assert not (out["token_type_ids"].bool() & ~out["attention_mask"].bool()).any()  # padding is never a target
