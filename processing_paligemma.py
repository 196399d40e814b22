"""PaliGemma input processing: images -> pixel values, prompts -> `<image>` × N, BOS, prompt, "\\n" token ids;
and the way back for detection answers: `<locYYYY>` groups -> labelled boxes in pixels, drawn on the image.

Checked against transformers `models/paligemma/processing_paligemma.py` and `SiglipImageProcessor` (v5.23; the
tests compare ids exactly and pixels to 1e-6) and big_vision's PaliGemma README (prompt format).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_TOKEN = "<image>"


class ProcessorError(ValueError):
    """Bad input to the processor (wrong types, counts or an image that cannot be converted)."""


def image_token_id(tokenizer) -> int:
    """The id of `<image>` in `tokenizer` (transformers adds it to PaliGemma's SentencePiece vocabulary); raises
    ProcessorError for a tokenizer without it, i.e. not a PaliGemma checkpoint's."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ProcessorError("the tokenizer has no <image> token; use a PaliGemma checkpoint's tokenizer")
    return token_id


def check_prompt(prompt: object, name: str = "prompt") -> str:
    """A prompt must be text the tokenizer can take: a str, valid Unicode, without the literal `<image>` (the
    processor puts the image tokens first itself; one more would ask for a second image). Returns it; raises
    ProcessorError naming `name` (the command line passes "--prompt")."""
    if not isinstance(prompt, str):
        raise ProcessorError(f"{name} must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: argv bytes that were not UTF-8, decoded with surrogateescape
        raise ProcessorError(f"{name} holds bytes that are not valid UTF-8 text (at character {e.start}); give the "
                             f"{name} as UTF-8 text") from None
    if IMAGE_TOKEN in prompt:
        raise ProcessorError(f"{name} contains the text {IMAGE_TOKEN}: the image tokens are put before every prompt "
                             f"for you — remove {IMAGE_TOKEN} from the {name}")
    return prompt


def _as_batch(value: object, name: str, kind: type, what: str) -> list:
    """`value` as a list of `kind` (one `kind` alone is a batch of one); ProcessorError naming `name` otherwise."""
    items = [value] if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, kind) for v in items):
        shown = type(value).__name__ if not isinstance(value, (list, tuple)) else \
            f"a {type(value).__name__} holding {', '.join(sorted({type(v).__name__ for v in value}))}"
        raise ProcessorError(f"{name} must be {what}, got {shown}")
    return list(items)


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


def squash(image: Image.Image, image_size: int) -> Image.Image:
    """The image as the model sees it before normalising: RGB, squash-resized (no crop, aspect ratio not kept) to
    image_size² with bicubic resampling. Squashing an already squashed image changes nothing (Pillow copies at the
    same size), so a caller may squash early (serve.py, to hold small images in its queue)."""
    return to_rgb(image).resize((image_size, image_size), resample=Image.Resampling.BICUBIC)


def preprocess_image(image: Image.Image, image_size: int) -> np.ndarray:
    """One PIL image -> float32 (3, S, S) in [-1, 1]: squash, x/255, then (x - 0.5) / 0.5 — the SigLIP
    normalisation PaliGemma was trained with."""
    x = np.asarray(squash(image, image_size), dtype=np.float32) * np.float32(1 / 255)  # (S, S, 3)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return x.transpose(2, 0, 1)  # (3, S, S)


class PaliGemmaProcessor:
    """Turns (prompt, image) pairs into model inputs.

    `processor(text=[...], images=[...])` returns {"input_ids": (B, T) long, "attention_mask": (B, T) long,
    "pixel_values": (B, 3, S, S) float32}; rows are left-padded to the longest prompt so every row's last token
    sits at the same position, which is what batched generation needs. With `suffix=` (fine-tuning) each row is
    prompt + suffix + EOS and `token_type_ids` and `labels` come too (see __call__).
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_token_id = image_token_id(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.newline_id = self._encode("\n")

    def _encode(self, text: str) -> list[int]:
        # Without the tokenizer's own specials: PaliGemma 1's tokenizer adds BOS, PaliGemma 2's does not, so
        # we insert BOS ourselves and both behave the same.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """`<image>` × N, BOS, the prompt's tokens, "\\n" (not added twice when the prompt ends with one)."""
        check_prompt(prompt)
        # The "\n" is tokenized together with the prompt, as transformers does, so a prompt ending in
        # whitespace merges with it exactly as it would there.
        text = prompt if prompt.endswith("\n") else prompt + "\n"
        return [self.image_token_id] * self.num_image_tokens + [self.bos_token_id] + self._encode(text)

    def suffix_ids(self, suffix: str) -> list[int]:
        """The training target's tokens then EOS; tokenized on its own, as transformers' text pair is. Checked as
        a prompt is (check_prompt): a literal `<image>` in a target would ask for one image feature more than the
        image gives, and fail a whole training batch later, far from the data line that holds it."""
        check_prompt(suffix, "suffix")
        return self._encode(suffix) + [self.tokenizer.eos_token_id]

    def __call__(self, text: Sequence[str] | str, images: Sequence[Image.Image] | Image.Image,
                 suffix: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        """One prompt per image (a single str and image are a batch of one) -> the tensors described above.

        suffix (fine-tuning): one target text per prompt, appended after the prompt's "\n" with EOS after it.
        Then the result also holds `token_type_ids` (0 on image + prompt + padding, 1 on the suffix) and `labels`
        (the ids on the suffix, -100 elsewhere), as transformers' `PaliGemmaProcessor(..., suffix=...)` returns.
        """
        prompts = _as_batch(text, "text", str, "a prompt string or a list of them")
        imgs = _as_batch(images, "images", Image.Image, "a PIL.Image.Image or a list of them (open files with "
                         "PIL.Image.open(path), arrays with PIL.Image.fromarray(array))")
        if len(prompts) != len(imgs):
            raise ProcessorError(f"got {len(prompts)} prompts for {len(imgs)} images; give one prompt per image")
        if not prompts:
            raise ProcessorError("no prompts/images given")
        suffixes = None if suffix is None else _as_batch(suffix, "suffix", str, "a target string or a list of them")
        if suffixes is not None and len(suffixes) != len(prompts):
            raise ProcessorError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts; give one per prompt")
        for im in imgs:
            if im.width < 1 or im.height < 1:
                raise ProcessorError(f"an image is empty ({im.width}x{im.height} pixels); give a real picture")
        prefix_rows = [self.prompt_ids(p) for p in prompts]
        suffix_rows = [[] for _ in prompts] if suffixes is None else [self.suffix_ids(s) for s in suffixes]
        T = max(len(p) + len(s) for p, s in zip(prefix_rows, suffix_rows, strict=True))
        input_ids = torch.full((len(prompts), T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
        token_type_ids = torch.zeros((len(prompts), T), dtype=torch.long)
        for b, (prefix, target) in enumerate(zip(prefix_rows, suffix_rows, strict=True)):
            row = prefix + target
            input_ids[b, T - len(row):] = torch.tensor(row)  # left padding
            attention_mask[b, T - len(row):] = 1
            if target:
                token_type_ids[b, T - len(target):] = 1
        pixels = []
        for im in imgs:
            try:
                pixels.append(preprocess_image(im, self.image_size))
            except (ValueError, OSError, TypeError) as e:  # e.g. a PIL mode with no RGB conversion
                raise ProcessorError(f"cannot convert an image of mode {im.mode} to RGB ({e}); save it as RGB") \
                    from None
        pixel_values = torch.from_numpy(np.stack(pixels))
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if suffixes is not None:
            out["token_type_ids"] = token_type_ids
            # Padding is token type 0, so it is -100 too (transformers: labels = ids where token_type_ids == 1).
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return out


# ---------------------------------------------------------------------------------------------------------------
# detection answers: "<loc0051><loc0309><loc0708><loc0646> shoe ; <loc...>x4 dog" -> boxes
# ---------------------------------------------------------------------------------------------------------------

LOC_BINS = 1024  # <loc0000> .. <loc1023>
_LOC_RUN = re.compile(r"((?:<loc\d{4}>)+)")
_LOC = re.compile(r"<loc(\d{4})>")
_SEG_RUN = re.compile(r"^(?:<seg\d{3}>)+")


@dataclass(frozen=True)
class Detection:
    """One object of a detection answer.

    box: (x_min, y_min, x_max, y_max) in pixels of the original image (0 .. width, 0 .. height), 2 decimals.
    loc: the four bins as generated, in PaliGemma's order (y_min, x_min, y_max, x_max), each 0 .. 1023.
    """

    label: str
    box: tuple[float, float, float, float]
    loc: tuple[int, int, int, int]

    def to_json(self) -> dict:
        return {"label": self.label, "box": list(self.box), "loc": list(self.loc)}


def parse_detections(text: str, width: int, height: int) -> tuple[list[Detection], list[str]]:
    """A detection answer -> (boxes, problems); never raises.

    The answer is groups of four `<locYYYY>` tokens (y_min, x_min, y_max, x_max) and a label, separated by " ; ".
    Bin b becomes b / 1023 * size, the rule of big_vision's PaliGemma evaluator
    (google-research/big_vision, big_vision/evaluators/proj/paligemma/transfers/segmentation.py: `tokens / 1023`
    then `* h`, `* w`; its training pp ops bin with `round(v * 1023)`), so <loc0000> is the image's first pixel
    edge and <loc1023> its last. `<segNNN>` mask tokens after a box (segmentation answers) are skipped.

    Only whole groups become boxes; every other part (too few or too many `<loc>` tokens, e.g. an answer cut
    off by the token limit, a missing label, a box whose max is not above its min — big_vision counts those as
    invalid too, a bin above 1023, text outside any group) is described in `problems`. Text without any
    `<loc` token is not a detection answer: no boxes, no problems.
    """
    boxes: list[Detection] = []
    problems: list[str] = []
    if not isinstance(text, str) or "<loc" not in text:
        return boxes, problems
    parts = _LOC_RUN.split(text)  # [before, locs1, after1, locs2, after2, ...]
    _report_stray(parts[0], "before the first box", problems)
    for n, (locs, after) in enumerate(zip(parts[1::2], parts[2::2], strict=True), start=1):
        head, _, rest = after.partition(";")
        label = _SEG_RUN.sub("", head.lstrip()).strip()
        group = f"group {n} ({_short((locs + head).strip())})"
        _report_stray(rest, f"after {group}", problems)
        bins = [int(b) for b in _LOC.findall(locs)]
        if len(bins) != 4:
            problems.append(f"{group}: {len(bins)} <loc> tokens, expected 4 (y_min, x_min, y_max, x_max)")
            continue
        if max(bins) >= LOC_BINS:
            problems.append(f"{group}: bin {max(bins)} is above {LOC_BINS - 1}")
            continue
        y0, x0, y1, x1 = bins
        if y1 <= y0 or x1 <= x0:
            problems.append(f"{group}: empty or inverted box (y {y0}..{y1}, x {x0}..{x1})")
            continue
        if not label:
            problems.append(f"{group}: no label after the box")
            continue
        box = tuple(round(b / (LOC_BINS - 1) * size, 2) for b, size in ((x0, width), (y0, height), (x1, width),
                                                                          (y1, height)))
        boxes.append(Detection(label, box, (y0, x0, y1, x1)))
    return boxes, problems


def _report_stray(text: str, where: str, problems: list[str]) -> None:
    stray = text.strip(" ;\n")
    if stray:
        problems.append(f"text {_short(stray)} {where} is not part of any box")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# Distinct, saturated colours (one per label, in order of first appearance).
_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of `image` (as RGB) with each box outlined and its label in a tag at the box's top-left corner.

    Everything drawn for a box stays inside that box (a tag wider than a small box is cut at its edge), so the
    drawing changes no pixel outside the boxes.
    """
    out = to_rgb(image).copy()
    width, height = out.size
    line = max(1, round(min(width, height) / 120))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(out)
    colors: dict[str, tuple[int, int, int]] = {}
    for det in detections:
        color = colors.setdefault(det.label, _COLORS[len(colors) % len(_COLORS)])
        # Pixel (i, j) covers [i, i+1): the box's pixels run from floor(min) to ceil(max) - 1.
        x0, y0 = (min(max(math.floor(v), 0), lim - 1) for v, lim in zip(det.box[:2], (width, height), strict=True))
        x1, y1 = (min(max(math.ceil(v) - 1, 0), lim - 1) for v, lim in zip(det.box[2:], (width, height), strict=True))
        x1, y1 = max(x0, x1), max(y0, y1)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), det.label, font=font)
        pad = 2
        tag = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), color)
        ImageDraw.Draw(tag).text((pad - left, pad - top), det.label, fill=(255, 255, 255), font=font)
        out.paste(tag.crop((0, 0, min(tag.width, x1 - x0 + 1), min(tag.height, y1 - y0 + 1))), (x0, y0))
    return out
