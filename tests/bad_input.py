"""Helpers shared by the tests of bad input (tests/test_errors_*.py, the error catalogue, and
tests/test_hostile_*.py): what an error must look like, damaged copies of a checkpoint, a noise JPEG, image files
on which Pillow fails with exceptions other than OSError."""

import io
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_image
from PIL import Image
from safetensors.torch import load_file, save_file

from utils import weight_files

FAST = ("--max_tokens_to_generate", "2")
SHARD_1 = "model-00001-of-00003.safetensors"


def jpg_fixture(seed: int):
    """A module-scoped fixture `jpg`: a 40x30 noise JPEG drawn with `seed`."""
    @pytest.fixture(scope="module")
    def jpg(tmp_path_factory) -> Path:
        path = tmp_path_factory.mktemp("img") / "ok.jpg"
        random_image(seed, (40, 30)).save(path)
        return path
    return jpg


def two_page_tiff(path: Path) -> None:
    """A 2-page TIFF whose second page lacks its ImageWidth tag: Pillow raises TypeError("Missing dimensions")."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "TIFF", save_all=True, append_images=[Image.new("RGB", (8, 8), "blue")])
    data = bytearray(buf.getvalue())
    first = struct.unpack("<I", data[4:8])[0]
    ifd = struct.unpack("<I", data[first + 2 + 12 * struct.unpack("<H", data[first:first + 2])[0]:][:4])[0]
    for k in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry:entry + 2])[0] == 256:  # ImageWidth -> an unknown tag
            data[entry:entry + 2] = struct.pack("<H", 0x9999)
    path.write_bytes(bytes(data))


def dds_unknown_format(path: Path) -> None:
    """A DDS file whose pixel-format flags are 0: Pillow raises NotImplementedError("Unknown pixel format ...")."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = struct.pack("<I", 0)  # DDS_PIXELFORMAT.dwFlags
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------------
# what an error looks like
# ---------------------------------------------------------------------------------------------------------------

def error_line(err: str, *needles: str) -> str:
    """Exactly one stderr line starting with "error:", mentioning every needle, and no traceback -> that line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def assert_error(run, code: int, *needles: str) -> str:
    """Exit code, exactly one 'error:' line mentioning every needle, no traceback, nothing on stdout."""
    line = error_line(run.stderr, *needles)
    assert run.returncode == code, run.stderr
    assert run.stdout == ""
    return line


def assert_ok(run) -> None:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "error:" not in run.stderr, run.stderr
    assert run.stdout.endswith("\n") and run.stdout.count("\n") >= 1


def one_error(code: int, out: str, err: str, expected_code: int = 2, *needles: str) -> str:
    """exit code, exactly one stderr line starting with "error:" holding every needle, no traceback or warning."""
    assert code == expected_code, err
    line = error_line(err, *needles)
    assert "Warning" not in err, err
    return line


def fail(exc: BaseException) -> Callable:
    """A stand-in for a function that raises exc whatever it is called with."""
    def raiser(*args, **kwargs):
        raise exc
    return raiser


# ---------------------------------------------------------------------------------------------------------------
# damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------

def linked_copy(src: Path, dst: Path, copy: tuple[str, ...] = ("config.json",)) -> Path:
    """A checkpoint directory whose files link to src's, but for `copy` (copied, so they can be edited)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            if f.name in copy:
                shutil.copy(f, dst / f.name)
            else:
                (dst / f.name).symlink_to(f)
    return dst


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    """Rewrite the JSON file `path` as fn(data) leaves it."""
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def set_field(path: str, value) -> Callable[[dict], None]:
    """An edit for edit_json: set the dotted `path` ("text_config.head_dim") to value, creating sections."""
    def fn(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return fn


def edit_first_shard(path: Path, fn: Callable[[dict[str, torch.Tensor], str], object]) -> str:
    """Rewrite the first shard of the checkpoint at `path` as fn(tensors, key) leaves it, key being its first
    tensor name in sorted order -> key. A shard that links elsewhere is replaced by a file, its target untouched."""
    shard = weight_files(path)[0]
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    fn(tensors, key)
    shard.unlink()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return key
