"""Hostile files beyond the error catalogue: weights holding NaN, Inf, bfloat16 values beyond float16's range or
float8; shard files that are FIFOs, directories, symlink loops, dangling links or unreadable; special files
(FIFO, socket, device, symlink loop, dangling link) given as the image; an output image that is a device or whose
write fails midway. Each ends in exactly one "error:" line with exit 2 naming the file (and tensor), no
traceback, no library warning, and never a half-written file (fileio.atomic_path).

The CLI cases run in-process (`cli_in_process`, the same code path as the command line without interpreter
start-up) on copies of a tiny checkpoint whose files link to the original's but for the damaged one.
"""

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch
from bad_input import FAST, edit_first_shard, jpg_fixture, linked_copy, one_error
from conftest import cli_in_process
from PIL import Image

from fileio import atomic_path
from utils import weight_files

jpg = jpg_fixture(3)


def _damaged_first_shard(ckpt: Path, dst: Path, fn) -> tuple[Path, str]:
    """A linked copy of ckpt at dst whose first shard is rewritten by fn(tensors, key) -> (copy, key)."""
    bad = linked_copy(ckpt, dst, copy=())
    return bad, edit_first_shard(bad, fn)


@pytest.mark.parametrize("damage", ["one NaN", "all Inf"])
def test_non_finite_weight_is_named(ckpt, jpg, tmp_path, capsys, damage):
    def fn(tensors, key):
        if damage == "one NaN":
            tensors[key].view(-1)[tensors[key].numel() // 2] = float("nan")
        else:
            tensors[key].fill_(float("inf"))
    bad, key = _damaged_first_shard(ckpt, tmp_path / "ckpt", fn)
    kind = "NaN" if damage == "one NaN" else "infinite"
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, key, kind, "damaged")


def test_bfloat16_beyond_float16_range_is_named(checkpoint, jpg, tmp_path, capsys):
    src = checkpoint("pg2-new-bf16-112")
    bad, key = _damaged_first_shard(src, tmp_path / "ckpt", lambda t, k: t[k].view(-1).__setitem__(0, 1e10))
    line = one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--dtype", "float16", *FAST), 2, key)
    assert "float16's range" in line
    assert cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--dtype", "bfloat16", *FAST)[0] == 0


def test_float8_tensor_is_named(ckpt, jpg, tmp_path, capsys):
    bad, key = _damaged_first_shard(ckpt, tmp_path / "ckpt",
                                    lambda t, k: t.__setitem__(k, t[k].to(torch.float8_e4m3fn)))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, key, "F8")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink loop", "dangling symlink", "unreadable"])
def test_odd_shard_file_is_named(ckpt, jpg, tmp_path, capsys, monkeypatch, kind):
    bad = linked_copy(ckpt, tmp_path / "ckpt")
    shard = weight_files(ckpt)[1].name
    (bad / shard).unlink()
    expected = {"fifo": "not a regular file", "directory": "is a directory", "symlink loop": "symbolic links",
                "dangling symlink": "missing", "unreadable": "permission denied"}[kind]
    if kind == "fifo":
        os.mkfifo(bad / shard)
    elif kind == "directory":
        (bad / shard).mkdir()
    elif kind == "symlink loop":
        (bad / shard).symlink_to(bad / "loop")
        (bad / "loop").symlink_to(bad / shard)
    elif kind == "dangling symlink":
        (bad / shard).symlink_to(bad / "gone.safetensors")
    else:
        shutil.copy(weight_files(ckpt)[1], bad / shard)
        (bad / shard).chmod(0)  # root reads it anyway, so access() is made to answer as for another user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == shard else real_access(p, mode))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, shard, expected)


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "symlink loop", "dangling symlink"])
def test_special_file_as_image(ckpt, tmp_path, capsys, kind):
    path = tmp_path / "img.jpg"
    needle = "not a regular file"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "symlink loop":
        path.symlink_to(tmp_path / "other.jpg")
        (tmp_path / "other.jpg").symlink_to(path)
        needle = "symbolic links"
    else:
        path.symlink_to(tmp_path / "gone.jpg")
        needle = "symlink to a missing file"
    try:
        one_error(*cli_in_process(capsys, "--model_path", ckpt, "-i", path, *FAST), 2, str(path), needle)
    finally:
        if kind == "socket":
            sock.close()


def test_output_image_device_refused(ckpt, jpg, capsys):
    one_error(*cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "detect x", "--output_image",
                              "/dev/full", *FAST), 2, "/dev/full")


def test_drawing_is_written_whole_or_not_at_all(ckpt, jpg, tmp_path, capsys, monkeypatch):
    target = tmp_path / "drawn.png"
    target.write_bytes(b"old drawing")

    def failing_save(self, fp, format=None, **params):  # noqa: A002 — Pillow's parameter name
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", failing_save)
        code, out, err = cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "detect x",
                                        "--output_image", target, *FAST)
    one_error(code, out, err, 2, str(target), "No space left")
    assert target.read_bytes() == b"old drawing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png"]  # no temporary file left behind
    assert cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "detect x", "--output_image", target,
                          *FAST)[0] == 0
    assert Image.open(target).format == "PNG" and sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png"]


def test_atomic_path(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
