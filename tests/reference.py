"""The reference side of the parity tests: transformers' PaliGemma on the same checkpoint directory."""

from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PaliGemmaForConditionalGeneration, SiglipImageProcessorPil

from utils import load_config

transformers.logging.set_verbosity_error()


def hf_model(path: Path) -> PaliGemmaForConditionalGeneration:
    return PaliGemmaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_processor(path: Path) -> transformers.PaliGemmaProcessor:
    """transformers' processor with its PIL image backend (the one SiglipImageProcessor historically was)."""
    vc = load_config(path).vision_config
    image_processor = SiglipImageProcessorPil(
        size={"height": vc.image_size, "width": vc.image_size}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    image_processor.image_seq_length = vc.num_image_tokens
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's largest magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
