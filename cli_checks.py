"""The command line's checks: flag names and values, image files, and every failure as one "error:" line.

Split out of inference.py (which keeps `main`, the generation code and `cli`) so each file reads in one go.
Everything here runs before the model loads, so a mistake costs a second, not a model load; `describe` turns
any exception into an exit code and one line (README "Errors").
"""

from __future__ import annotations

import difflib
import inspect
import struct
import sys
import warnings
from collections.abc import Callable
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


# Flags whose value is text: passed to fire as a quoted literal so that e.g. --prompt 1e3 stays "1e3"
# (fire would otherwise turn it into the float 1000.0) and --model_path 2024 stays a path.
_TEXT_FLAGS = ("model_path", "prompt", "image_file_path", "device", "dtype")


def prepare_argv(argv: list[str], main: Callable) -> list[str]:
    """Check flag names before fire runs `main` (fire runs it first and complains about unknown flags after) and
    quote the values of text flags. Raises UsageError for an unknown flag or a surplus positional argument."""
    params = inspect.signature(main).parameters
    bools = {n for n, p in params.items() if isinstance(p.default, bool)}
    out, given, positional = [], set(), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # fire's own flags follow
            out += argv[i:]
            break
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
