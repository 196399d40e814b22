"""PaliGemma input processing: images -> pixel values, prompts -> `<image>` × N, BOS, prompt, "\\n" token ids.

Checked against transformers `models/paligemma/processing_paligemma.py` and `SiglipImageProcessor` (v5.23; the
tests compare ids exactly and pixels to 1e-6) and big_vision's PaliGemma README (prompt format).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<image>"


class ProcessorError(ValueError):
    """Bad input to the processor (wrong types, counts or an image that cannot be converted)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency onto white (as transformers' convert_to_rgb does).

    Palette images with a transparent index and LA/RGBA/PA go through RGBA so transparent pixels become white
    rather than whatever colour the hidden pixels hold. 16-bit greyscale ("I;16", "I") is scaled to 8 bits
    first: Pillow's own conversion clips it at 255, which turns most 16-bit photos white.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # uint8 (H, W) -> mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: Image.Image, image_size: int) -> np.ndarray:
    """One PIL image -> float32 (3, S, S) in [-1, 1].

    Squash-resize (no crop, aspect ratio not kept) with bicubic resampling, x/255, then (x - 0.5) / 0.5 — the
    SigLIP normalisation PaliGemma was trained with.
    """
    rgb = to_rgb(image).resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255)  # (S, S, 3)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return x.transpose(2, 0, 1)  # (3, S, S)


class PaliGemmaProcessor:
    """Turns (prompt, image) pairs into model inputs.

    `processor(text=[...], images=[...])` returns {"input_ids": (B, T) long, "attention_mask": (B, T) long,
    "pixel_values": (B, 3, S, S) float32}; rows are left-padded to the longest prompt so every row's last token
    sits at the same position, which is what batched generation needs.
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ProcessorError("the tokenizer has no <image> token; use a PaliGemma checkpoint's tokenizer")
        self.bos_token_id = tokenizer.bos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.newline_id = self._encode("\n")

    def _encode(self, text: str) -> list[int]:
        # Without the tokenizer's own specials: PaliGemma 1's tokenizer adds BOS, PaliGemma 2's does not, so
        # we insert BOS ourselves and both behave the same.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """`<image>` × N, BOS, the prompt's tokens, "\\n" (not added twice when the prompt ends with one)."""
        if not isinstance(prompt, str):
            raise ProcessorError(f"a prompt must be a string, got {type(prompt).__name__}")
        # The "\n" is tokenized together with the prompt, as transformers does, so a prompt ending in
        # whitespace merges with it exactly as it would there.
        text = prompt if prompt.endswith("\n") else prompt + "\n"
        return [self.image_token_id] * self.num_image_tokens + [self.bos_token_id] + self._encode(text)

    def __call__(
        self,
        text: Sequence[str] | str,
        images: Sequence[Image.Image] | Image.Image,
        padding: str = "longest",
    ) -> dict[str, torch.Tensor]:
        prompts = [text] if isinstance(text, str) else list(text)
        imgs = [images] if isinstance(images, Image.Image) else list(images)
        if len(prompts) != len(imgs):
            raise ProcessorError(f"got {len(prompts)} prompts for {len(imgs)} images; give one prompt per image")
        if not prompts:
            raise ProcessorError("no prompts/images given")
        for im in imgs:
            if not isinstance(im, Image.Image):
                raise ProcessorError(f"images must be PIL images, got {type(im).__name__}")
            if im.width < 1 or im.height < 1:
                raise ProcessorError(f"an image is empty ({im.width}x{im.height} pixels); give a real picture")
        ids = [self.prompt_ids(p) for p in prompts]
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, row in enumerate(ids):
            input_ids[b, T - len(row):] = torch.tensor(row)  # left padding
            attention_mask[b, T - len(row):] = 1
        pixels = []
        for im in imgs:
            try:
                pixels.append(preprocess_image(im, self.image_size))
            except (ValueError, OSError, TypeError) as e:  # e.g. a PIL mode with no RGB conversion
                raise ProcessorError(f"cannot convert an image of mode {im.mode} to RGB ({e}); save it as RGB") \
                    from None
        pixel_values = torch.from_numpy(np.stack(pixels))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
