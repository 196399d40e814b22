"""The fine-tuning dataset: a JSON Lines file of `{"image": path, "prefix": prompt, "suffix": target}`, image paths
relative to the file, checked line by line before training; and the deterministic batch order (per epoch a shuffle
seeded by seed + epoch, so a resumed run sees the batches the interrupted one would have).

A bad line (not UTF-8, not JSON, a missing or non-string field, an empty suffix, a missing or unreadable image,
prompt + suffix longer than the model's positions, a prefix or suffix the processor refuses: a literal `<image>`, a
lone surrogate) is reported with its line number; strict=True stops at the first with a DataError, otherwise it is
skipped and counted. Blank lines are ignored. Lines end at "\n" only (a "\r" before it is JSON whitespace).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cli_checks import one_line
from image_files import ImageError, load_image
from processing_paligemma import PaliGemmaProcessor, check_prompt, to_rgb


class DataError(ValueError):
    """A dataset that cannot be used: unreadable, a bad line under strict=True, or no usable line at all."""


@dataclass(frozen=True)
class Example:
    """One usable line: its number (1-based), the image's path, the prompt and the target text."""

    line: int
    image: Path
    prefix: str
    suffix: str


def _check_line(raw: bytes, root: Path, processor: PaliGemmaProcessor, max_positions: int) -> Example | str:
    """One line (its bytes) -> its Example, or what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} of the line); save the file as UTF-8"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return f'expected an object {{"image": ..., "prefix": ..., "suffix": ...}}, got {type(record).__name__}'
    for key in ("image", "suffix"):
        if key not in record:
            return f'no "{key}" field'
    for key in ("image", "prefix", "suffix"):
        if key in record and not isinstance(record[key], str):
            return f'"{key}" must be a string, got {type(record[key]).__name__}'
    prefix, suffix = record.get("prefix", ""), record["suffix"]
    if not suffix.strip():
        return 'the suffix is empty: there is nothing to learn from this line'
    image = root / record["image"]
    if not image.is_file():
        return f"image {image} does not exist"
    try:
        load_image(str(image))
    except (ImageError, OSError) as e:
        return one_line(e)
    try:
        check_prompt(prefix, "prefix")  # what prompt_ids checks, named as the line names it
        n = len(processor.prompt_ids(prefix)) + len(processor.suffix_ids(suffix))
    except (ValueError, TypeError) as e:  # ProcessorError: a literal <image>, a lone surrogate (\ud800 in JSON)
        return one_line(e)
    if n > max_positions:
        return f"image + prompt + suffix are {n} tokens, more than the model's {max_positions} positions"
    return Example(0, image, prefix, suffix)


def read_dataset(path: str | os.PathLike, processor: PaliGemmaProcessor, max_positions: int, strict: bool = False,
                 report: Callable[[str], None] = print) -> tuple[list[Example], int]:
    """The usable examples of a JSON Lines file and how many lines were skipped; each problem goes to `report` as
    "PATH:LINE: what is wrong". strict: raise DataError at the first bad line instead."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the dataset {path}: {one_line(e)}") from None
    # JSON Lines records end at b"\n" only: str.splitlines() would also split at U+2028, U+0085 and the like, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings. Each line is decoded alone, so one byte that is
    # not UTF-8 costs that line (reported by number), not the whole file. A leading BOM (Windows editors) is dropped.
    examples: list[Example] = []
    skipped = 0
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not raw.strip():
            continue
        checked = _check_line(raw, path.parent, processor, max_positions)
        if isinstance(checked, str):
            message = f"{path}:{number}: {checked}"
            if strict:
                raise DataError(f"{message} (--strict stops at the first bad line)")
            report(f"skipped {message}")
            skipped += 1
        else:
            examples.append(Example(number, checked.image, checked.prefix, checked.suffix))
    if not examples:
        raise DataError(f"{path} has no usable line ({skipped} skipped); each line is "
                        '{"image": "relative/path.jpg", "prefix": "caption en", "suffix": "the answer"}')
    return examples, skipped


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded random eval_fraction of the examples held out (at least one when > 0)."""
    if eval_fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"--eval_fraction {eval_fraction} leaves no training example of {len(examples)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def micro_batch(examples: list[Example], batch_size: int, seed: int, index: int) -> list[Example]:
    """The index-th micro-batch of the endless sequence of epochs (epoch e: a shuffle seeded by seed + e; its last
    batch may be smaller). Computed from the index alone, so resuming needs only the step counter."""
    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, k = divmod(index, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [examples[i] for i in order[k * batch_size:(k + 1) * batch_size]]


def collate(examples: list[Example], processor: PaliGemmaProcessor) -> dict[str, torch.Tensor]:
    """Model inputs with token_type_ids and labels for a list of examples."""
    images: list[Image.Image] = [to_rgb(load_image(str(e.image))) for e in examples]
    return processor(text=[e.prefix for e in examples], images=images, suffix=[e.suffix for e in examples])
