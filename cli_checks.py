"""The command line's checks: flag names and values, image paths and files, output paths, and every failure as
one "error:" line.

Split out of inference.py (which keeps `main`, the generation code and `cli`) so each file reads in one go.
The checks run before the model loads, so a mistake costs a second, not a model load (with several images,
`load_image` also runs per image later, and a failure there becomes that image's error line); `describe`
turns any exception into an exit code and one line (README "Errors").
"""

from __future__ import annotations

import difflib
import glob
import inspect
import os
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from processing_paligemma import ProcessorError
from utils import CheckpointError


class ImageError(ValueError):
    """An image file that cannot be used as-is; the message names the file and what to do."""


class UsageError(ValueError):
    """A command-line flag that is missing, unknown or has a bad value."""


def load_image(path: str) -> Image.Image:
    """Open an image file fully (so truncation is caught here), apply EXIF orientation as transformers does.

    Raises ImageError for a missing path, a directory, an empty/unreadable/truncated file, or one above Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS; refused already at 1x, where Pillow only warns). An
    animated image gives its first frame, with a note on stderr.
    """
    p = Path(path)
    if not str(path):
        raise ImageError("no image given; pass --image_file_path FILE")
    if not p.exists():
        raise ImageError(f"image file {p} does not exist; check --image_file_path")
    if p.is_dir():
        raise ImageError(f"image path {p} is a directory; give an image file inside it")
    if p.stat().st_size == 0:
        raise ImageError(f"image file {p} is empty (0 bytes); re-download or re-save it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                out = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image file {p} is too large to decode safely ({str(e).split(',')[0]}); downscale it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PaliGemma sees at most 896x896 anyway)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{p} is not an image file Pillow can read; give a JPEG, PNG, GIF, WebP, BMP or TIFF file"
        ) from None
    except PermissionError:
        raise ImageError(f"image file {p} cannot be read (permission denied); check its permissions") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageError(
            f"image file {p} is truncated or corrupt ({one_line(e)}); re-download or re-save it"
        ) from None
    if frames > 1:
        log(f"note: {p.name} has {frames} frames; using the first")
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Exit codes: 2 bad input (flags, image, checkpoint), 1 out of memory or an unexpected error, 130 interrupted.
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

def describe(e: BaseException, stage: str) -> tuple[int, str]:
    """An exception -> (exit code, the one-line message after "error: ")."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted while {stage}"
    oom = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
    if oom:
        detail = f" ({one_line(e)[:200]})" if str(e) else ""
        if stage == "generating":
            hint = "lower --max_tokens_to_generate, use --dtype bfloat16, or use a device with more memory"
        else:
            hint = "try --dtype bfloat16 (half of float32), a smaller checkpoint, or a device with more memory"
        return EXIT_FAILURE, f"out of memory while {stage}{detail}; {hint}"
    if isinstance(e, (CheckpointError, ProcessorError, ImageError, UsageError, ValueError)):
        return EXIT_BAD_INPUT, one_line(e)
    if isinstance(e, OSError) and e.filename is not None:
        return EXIT_BAD_INPUT, f"{e.strerror or one_line(e)}: {e.filename}; check the path and its permissions"
    return EXIT_FAILURE, (f"unexpected {type(e).__name__} while {stage}: {one_line(e)[:300]}; "
                          "rerun with --debug for the traceback and report it")


def check_flags(max_tokens, temperature, top_p, top_k, do_sample, only_cpu) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"--max_tokens_to_generate must be a positive integer, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise UsageError(f"--temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"--top_k must be an integer >= 0, got {top_k!r}")
    for name, value in (("--do_sample", do_sample), ("--only_cpu", only_cpu)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")


def check_run_flags(model_path, image_file_path, device, only_cpu, seed, debug) -> None:
    if not isinstance(debug, bool):
        raise UsageError(f"--debug must be True or False, got {debug!r}")
    if model_path is None or model_path == "":
        raise UsageError("--model_path is required: the checkpoint directory (config.json, *.safetensors, tokenizer)")
    if image_file_path is None or image_file_path == "":
        raise UsageError("--image_file_path is required: the image to ask about")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    if only_cpu and device is not None and str(device) != "cpu":
        raise UsageError(f"--only_cpu True contradicts --device {device}; give one of them")


def check_bool_flags(**flags) -> None:
    """Each --name must be exactly True or False (fire passes other words through as strings)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"--{name} must be True or False, got {value!r}")


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch_size must be a positive integer, got {batch_size!r}")


def expand_image_paths(spec: str | Sequence[str]) -> tuple[list[str], bool]:
    """--image_file_path -> (image paths in input order, whether the output is one JSON line per image).

    Each item is a file (kept even if unreadable: that image gets an error line), a directory (its files with an
    image extension, sorted by name, not recursive) or a glob such as "imgs/*.jpg" (quoted, so the shell leaves it;
    sorted). Several items, a directory or a glob mean JSON Lines even if they come to one image: the output format
    follows the command, not how many files happen to match.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    # What a directory contributes: files with an extension Pillow can open (.jpg, .png, .webp, .gif, .tif, ...).
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    many = len(items) > 1
    paths: list[str] = []
    for item in map(str, items):
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir()
                           if f.suffix.lower() in extensions and not f.name.startswith(".") and f.is_file())
            if not found:
                raise ImageError(f"image path {p} is a directory with no image files in it; give an image file or a "
                                 "directory of .jpg/.png/.webp/... images")
        elif not p.exists() and any(ch in item for ch in "*?["):
            found = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                raise ImageError(f"no files match --image_file_path {item}")
        else:
            paths.append(item)
            continue
        paths += found
        many = True
    return paths, many


def output_image_paths(output_image, image_paths: Sequence[str], many: bool) -> list[Path] | None:
    """--output_image -> where each image's drawing goes (None: no drawings), checked before the model loads.

    One image: PATH, a file name with an image extension in an existing directory. Several: PATH is an existing
    directory and image `x.jpg` is drawn to PATH/x.png (PNG keeps the thin box lines exact); the names must differ.
    An input image is never overwritten.
    """
    if output_image is None or output_image == "":
        return None
    out = Path(str(output_image))
    if many:
        if not out.is_dir():
            raise UsageError(f"--output_image {out} must be an existing directory when several images are given "
                             "(each drawing is saved there as <image name>.png)")
        targets = [out / (Path(p).stem + ".png") for p in image_paths]
        seen: dict[Path, str] = {}
        for target, src in zip(targets, image_paths, strict=True):
            if target in seen:
                raise UsageError(f"--output_image: {seen[target]} and {src} would both be drawn to {target}; rename "
                                 "one or run them separately")
            seen[target] = src
    else:
        if out.is_dir():
            raise UsageError(f"--output_image {out} is a directory; give a file name such as {out / 'boxes.png'}")
        fmt = Image.registered_extensions().get(out.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise UsageError(f"--output_image {out}: Pillow cannot write {out.suffix or 'files without an extension'}; "
                             "use .png or .jpg")
        if not out.parent.is_dir():
            raise UsageError(f"--output_image {out}: directory {out.parent} does not exist")
        targets = [out]
    for target in targets:
        if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise UsageError(f"--output_image {target} is not writable; check the directory's permissions")
        for src in image_paths:
            if target.exists() and Path(src).exists() and target.samefile(src):
                raise UsageError(f"--output_image {target} is the input image {src}; give another path")
    return targets


# Flags whose value is text: passed to fire as a quoted literal so that e.g. --prompt 1e3 stays "1e3"
# (fire would otherwise turn it into the float 1000.0) and --model_path 2024 stays a path.
_TEXT_FLAGS = ("model_path", "prompt", "image_file_path", "device", "dtype", "output_image")
# Flags that take every following word up to the next option (what the shell makes of `--image_file_path *.jpg`).
_LIST_FLAGS = ("image_file_path",)


def prepare_argv(argv: list[str], main: Callable) -> list[str]:
    """Check flag names before fire runs `main` (fire runs it first and complains about unknown flags after) and
    quote the values of text flags. Raises UsageError for an unknown flag or a surplus positional argument."""
    params = inspect.signature(main).parameters
    bools = {n for n, p in params.items() if isinstance(p.default, bool)}
    # The short forms --help lists (fire's rule: -x for the one flag whose name starts with x).
    firsts = [n[0] for n in params]
    shorts = {n[0]: n for n in params if firsts.count(n[0]) == 1}
    out, given, positional = [], set(), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # fire's own flags follow
            out += argv[i:]
            break
        if len(tok) >= 2 and tok[0] == "-" and tok[1] in shorts and tok[2:3] in ("", "="):
            tok = f"--{shorts[tok[1]]}{tok[2:]}"
        if not tok.startswith("--") or tok == "--help":
            if tok.startswith("-") and tok not in ("-h", "-", "--help") and not _is_number(tok):
                raise UsageError(f"unknown option {tok}; flags are spelled --name (see --help)")
            if not tok.startswith("-") or _is_number(tok):
                positional.append(tok)
            out.append(tok)
            i += 1
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if name not in params and name.startswith("no") and name[2:] in bools and not eq:
            given.add(name[2:])
            out.append(tok)
            i += 1
            continue
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise UsageError(f"unknown flag --{name}; {hint}see --help for the flags")
        given.add(name)
        if not eq:
            takes_value = name not in bools or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
            if not takes_value:
                out.append(tok)
                i += 1
                continue
            if i + 1 >= len(argv):
                raise UsageError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        if name in _LIST_FLAGS:
            values = [value]
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values.append(argv[i + 1])
                i += 1
            value = values[0] if len(values) == 1 else values  # a list literal: fire passes main a list
        out.append(f"--{name}={value!r}" if name in _TEXT_FLAGS else f"--{name}={value}")
        i += 1
    free = [n for n in params if n not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected argument {positional[len(free)]!r}; give options as --name value (see --help)")
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False
