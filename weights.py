"""Reading a checkpoint's safetensors weights into a model built on the meta device: which files (the index, or
`model.safetensors`), each file checked to be a readable regular file named inside the checkpoint directory,
every key mapped onto our module names (legacy and transformers-5 layouts), every shape and dtype checked,
every tensor checked to be finite, and float32 -> bf16 (or host -> GPU) conversion a chunk at a time from the
file's memory map, so peak memory stays near one copy of the weights. Pickled `*.bin` checkpoints are refused.

One loop (load_checkpoint) does this for every loader; a LoadPolicy supplies what differs per loader: how a
file's key maps to our name, which stored dtypes it reads, and what a stored tensor becomes. load_weights uses the
float policy; quantize.load_int8_weights its int8 one (quantize while reading, or take int8 views).

Checked against: the hub checkpoints' key layouts (../shared/PALIGEMMA_FACTS.md) and transformers' conversion
scripts; tests/test_loader.py and test_errors_*.py / test_hostile_*.py run every refusal.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from configuration_paligemma import CheckpointError
from modeling_gemma import PaliGemmaForConditionalGeneration

# Newer transformers save `model.<part>.*` (and no `.model.` level under the language model); map them onto the
# hub's legacy names, which are our module paths. Tied `lm_head.weight` copies are skipped without reading.
_NEW_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_TIED_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


def canonical_key(key: str) -> str | None:
    """Checkpoint key -> our parameter name (None for a tied lm_head copy, which is not loaded)."""
    if key in _TIED_HEAD_KEYS:
        return None
    for new, legacy in _NEW_PREFIXES:
        if key.startswith(new):
            key = legacy + key[len(new):]
            break
    # transformers 5 keeps the SigLIP transformer directly under vision_tower (no `vision_model.` level).
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def _check_shard_name(index: Path, key: str, name: Any) -> None:
    """An index entry must name a plain file beside the index: no directory part, no "..", not absolute, so an
    index can never make us open a file outside the checkpoint directory. The NAME is checked, not where it
    resolves to: the file itself may be a symlink (the Hugging Face cache's snapshots link into blobs/)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise CheckpointError(
            f"{index}: weight_map entry {key!r} names shard {name!r}, which is not a plain file name in the "
            "checkpoint directory (no '/', '..' or absolute path); nothing outside it is read — re-download the index"
        )


def _check_weight_file(path: Path, subject: str) -> None:
    """A weight file must be a readable regular file (it may be reached through a symlink). `subject` starts the
    message: "<index> names shard X, which" or the file's path."""
    try:
        st = path.stat()  # follows symlinks, as opening would
    except FileNotFoundError:
        link = " (a symlink to a missing file)" if path.is_symlink() else ""
        raise CheckpointError(f"{subject} is missing{link}; re-download it") from None
    except OSError as e:  # ELOOP for a symlink loop, EACCES for a directory we may not search
        raise CheckpointError(f"{subject} cannot be opened ({e.strerror}); re-download it") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{subject} is a directory, not a safetensors file; re-download it")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or a device would block or never end; a weight file is a plain file.
        raise CheckpointError(f"{subject} is not a regular file (a FIFO, socket or device); re-download it")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{subject} cannot be read (permission denied); check its permissions")


def weight_files(model_path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one. Refuses pickled weights."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            detail = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"{index} is not a valid safetensors index ({detail}); re-download it") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object (tensor name -> shard file); re-download it")
        for key, name in weight_map.items():
            _check_shard_name(index, key, name)
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            _check_weight_file(f, f"{index} names shard {f.name}, which")
        return files
    single = root / "model.safetensors"
    if single.exists() or single.is_symlink():  # a dangling link or a FIFO is reported as what it is
        _check_weight_file(single, f"{single}")
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CheckpointError(
            f"{root} holds only pickled weights (*.bin/*.pt); they are refused because unpickling runs code — "
            "download the safetensors files of the checkpoint"
        )
    raise CheckpointError(f"{root} has no model.safetensors or model.safetensors.index.json; download the weights")


FLOAT_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
# Bytes per element of every stored dtype some loader accepts (int8 checkpoints add I8), for progress.
_ITEMSIZE = {"I8": 1, **{name: dt.itemsize for name, dt in FLOAT_DTYPES.items()}}


# Dropping a read chunk's pages from our memory map (they stay in the page cache); None where the platform's
# mmap has no madvise (Windows): the pages then stay mapped until the shard closes.
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class ShardReader:
    """Reads tensors of one safetensors file through a read-only memory map of its own, a chunk at a time,
    dropping each chunk's pages from the map once used.

    Used when the stored dtype or device differs from the target, and by quantize.py to quantize while reading.
    Converting through safetensors' zero-copy slices would leave the whole float32 shard mapped into this process
    (counted in RSS until the file closes, so a float32 checkpoint loaded as bf16 would peak far above the bf16
    weights). Releasing each chunk (madvise MADV_DONTNEED) keeps the peak at the converted weights plus a chunk,
    and the conversion reads the page cache directly: no copy through a staging buffer, whose single-threaded
    reads cost ~2 s of a bf16 load of the 3B float32 checkpoint (benchmarks/README.md).
    """

    # Converting a float32 checkpoint to bf16 (or copying to a GPU, or quantizing to int8) maps this many bytes of
    # the file at a time, so the 2.1 GB float32 embedding never exists in host memory beside its converted copy.
    # Small, since a chunk is mapped when the peak is reached (the last shard's last tensors): int8's peak RSS is
    # within 15 % of its weights only with a small one. Loads measured as fast as with 64 MB (benchmarks/README.md).
    chunk_bytes = 16 << 20

    def __init__(self, path: Path):
        self.name = path.name
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(header_len))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # valid after the file object closes
        self.data_start = 8 + header_len  # data_offsets are relative to the end of the header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the buffer is not writable": nothing writes into it
            self.bytes: torch.Tensor | None = torch.frombuffer(self.map, dtype=torch.uint8)
        self._aligned: torch.Tensor | None = None  # staging for bytes that start misaligned (read_bytes)

    def offset(self, key: str) -> int:
        """Where tensor `key`'s bytes start in the file."""
        return self.data_start + self.header[key]["data_offsets"][0]

    def read_bytes(self, offset: int, nbytes: int, key: str, itemsize: int) -> torch.Tensor:
        """nbytes (at most chunk_bytes) of the file from offset, to be viewed as a dtype of itemsize bytes: a
        READ-ONLY view of the map (never write into it), or, where offset is not a multiple of itemsize (the
        format does not promise aligned data), a copy in a staging buffer valid until the next call. key names
        the tensor in the error for a file that ends early. release() the range once used."""
        chunk = self.bytes[offset:offset + nbytes]
        if chunk.numel() < nbytes:
            raise CheckpointError(f"{self.name} ends inside tensor {key}; re-download it")
        if offset % itemsize:
            if self._aligned is None:
                self._aligned = torch.empty(self.chunk_bytes, dtype=torch.uint8)
            chunk = self._aligned[:nbytes].copy_(chunk)
        return chunk

    def release(self, offset: int, nbytes: int) -> None:
        """Drop the map's pages under [offset, offset + nbytes) from this process. Safe for pages still to be
        read (a neighbouring chunk's): a read-only file mapping pages them in again from the page cache."""
        if _MADV_DONTNEED is None:
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self.map), -(-(offset + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if end > start:
            self.map.madvise(_MADV_DONTNEED, start, end - start)

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Float tensor `key` converted to dtype on device, one chunk at a time."""
        src_dtype = FLOAT_DTYPES[self.header[key]["dtype"]]
        out = torch.empty(self.header[key]["shape"], dtype=dtype, device=device)
        flat = out.view(-1)
        per_chunk = self.chunk_bytes // src_dtype.itemsize
        offset = self.offset(key)
        for start in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - start)
            at, nbytes = offset + start * src_dtype.itemsize, n * src_dtype.itemsize
            chunk = self.read_bytes(at, nbytes, key, src_dtype.itemsize)
            # safetensors stores little-endian data, which is every platform torch runs on.
            flat[start:start + n].copy_(chunk.view(src_dtype))
            self.release(at, nbytes)
        return out

    def close(self) -> None:
        self.bytes = None
        try:
            self.map.close()
        except BufferError:  # a chunk view is still alive (an error's traceback): the map closes when it goes
            pass


def check_finite(t: torch.Tensor, what: str, stored_as: torch.dtype) -> None:
    """Refuse a tensor holding NaN or +-Inf: one such value makes every answer empty or garbage, silently.

    min and max propagate NaN and show an infinity, so one reduction pass (no temporary the tensor's size, as
    isfinite(t).all() would allocate) tells. It runs on the tensor as loaded, after any conversion, so a value
    beyond float16's range read into float16 is caught too; that case is named as such, not as damage.
    """
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    if not bool(torch.isnan(low) | torch.isnan(high)) and t.dtype == torch.float16 != stored_as:
        raise CheckpointError(f"{what} has values beyond float16's range; load it as bfloat16 or float32")
    kind = "NaN" if bool(torch.isnan(low) | torch.isnan(high)) else "an infinite value"
    raise CheckpointError(f"{what} holds {kind}; the checkpoint is damaged — re-download it")


class Shard:
    """One open weight file, as the loop hands it to a policy: `file` (safe_open, for zero-copy views) and
    `reader()` (a ShardReader opened on first use: a shard read only as views is not mapped twice)."""

    def __init__(self, path: Path, file: Any):
        self.path, self.file = path, file
        self._reader: ShardReader | None = None

    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.path)
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a weight file that passed the loop's checks: its key in the file, our name for it, its
    shape and stored dtype (safetensors' name: "F32", "I8", ...)."""

    shard: Shard
    key: str
    name: str
    shape: torch.Size
    dtype: str

    @property
    def what(self) -> str:
        """How errors name it: "<file>: tensor <key>"."""
        return f"{self.shard.path.name}: tensor {self.key}"


def read_float(t: StoredTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stored float tensor as `dtype` on `device`, checked finite: a zero-copy view of the file's memory map
    when nothing changes (paged in on first use), else converted chunk by chunk by the shard's reader."""
    stored = FLOAT_DTYPES[t.dtype]
    if stored == dtype and device.type == "cpu":
        out = t.shard.file.get_tensor(t.key)
    else:
        out = t.shard.reader().read(t.key, dtype, device)
    check_finite(out, t.what, stored)
    return out


class LoadPolicy:
    """The per-tensor decisions of load_checkpoint's loop. This base reads a float checkpoint into the model's
    float parameters (load_weights); quantize.py's subclass changes the names and dtypes a file must hold and
    how a stored tensor becomes the loaded one(s)."""

    missing_hint = "re-download"  # ends the missing-tensor error: what the user should do

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        # our name -> shape of every tensor the weight files must hold (after name()); order = state_dict order
        self.expected: dict[str, torch.Size] = {name: t.shape for name, t in model.state_dict().items()}

    def name(self, key: str) -> str | None:
        """A file's key -> our name (None: a tied lm_head copy, checked but not loaded)."""
        return canonical_key(key)

    def check_dtype(self, path: Path, key: str, name: str | None, stored: str) -> None:
        """Refuse a stored dtype this loader does not read; runs first, on every tensor (name may be None or
        unexpected)."""
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path.name}: tensor {key} has dtype {stored}; PaliGemma weights are float32, bfloat16 or float16 "
                "(float8 and integer tensors are not read) — use the original checkpoint's files"
            )

    def read(self, t: StoredTensor) -> dict[str, torch.Tensor]:
        """The loaded tensor(s), by our name, that stored tensor t becomes."""
        return {t.name: read_float(t, self.dtype, self.device)}


def _check_key(t: StoredTensor, expected: dict[str, torch.Size], where: dict[str, str]) -> None:
    """A named tensor must be one the model expects, found once, with the shape config.json gives it."""
    path, key, name = t.shard.path, t.key, t.name
    if name not in expected:
        raise CheckpointError(
            f"{path.name}: unexpected tensor {key} (not part of this config's model); "
            "check config.json matches the weights"
        )
    if name in where:
        raise CheckpointError(f"{path.name}: tensor {key} also appears in {where[name]}")
    if t.shape != expected[name]:
        raise CheckpointError(
            f"{path.name}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(expected[name])} "
            "from config.json; the checkpoint and its config disagree"
        )


def _load_tensor(shard: Shard, key: str, policy: LoadPolicy, loaded: dict[str, torch.Tensor],
                 where: dict[str, str]) -> int:
    """Check one stored tensor and load what it becomes into `loaded`; returns the bytes it takes in the file (0
    for a tied lm_head copy, which is only checked)."""
    sl = shard.file.get_slice(key)
    shape, stored = torch.Size(sl.get_shape()), sl.get_dtype()
    name = policy.name(key)
    policy.check_dtype(shard.path, key, name, stored)
    if name is None:  # tied lm_head copy: check it, don't load it
        emb = policy.expected["language_model.model.embed_tokens.weight"]
        if shape != emb:
            raise CheckpointError(f"{shard.path.name}: {key} has shape {tuple(shape)}, expected {tuple(emb)}")
        return 0
    t = StoredTensor(shard, key, name, shape, stored)
    _check_key(t, policy.expected, where)
    loaded.update(policy.read(t))
    where[name] = shard.path.name
    return math.prod(shape) * _ITEMSIZE[stored]


def load_checkpoint(model: nn.Module, model_path: str | os.PathLike, policy: LoadPolicy,
                    on_bytes: Callable[[int], None] | None = None) -> None:
    """The one loading loop (load_weights, quantize.load_int8_weights): walk every weight file's tensors, check
    each key, shape and dtype, let `policy` turn it into loaded tensors, report progress, refuse a checkpoint
    that lacks a tensor, and hand the model its tensors (built on meta: assigned, not copied).

    on_bytes (progress): called with each tensor's size in bytes, and with the rest of each shard's file size
    (header, skipped tensors) after it, so the calls add up to the weight files' total size.
    """
    loaded: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}  # our name -> the file it came from (for the duplicate error)
    for path in weight_files(model_path):
        shard: Shard | None = None
        shard_done = 0
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shard = Shard(path, f)
                for key in f.keys():
                    nbytes = _load_tensor(shard, key, policy, loaded, where)
                    if on_bytes is not None and nbytes:
                        on_bytes(nbytes)
                        shard_done += nbytes
        except SafetensorError as e:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file ({e}); re-download it") from None
        except PermissionError:
            raise CheckpointError(f"{path} cannot be read (permission denied); check its permissions") from None
        finally:
            if shard is not None:
                shard.close()
        if on_bytes is not None:
            on_bytes(path.stat().st_size - shard_done)
    missing = [k for k in policy.expected if k not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]}{more} is missing from the weights in {model_path}; "
                              f"{policy.missing_hint}")
    # Every key and shape was checked above, so strict=True cannot fail here; assign=True adopts our tensors
    # instead of copying into meta storage.
    model.load_state_dict(loaded, strict=True, assign=True)


def load_weights(model: PaliGemmaForConditionalGeneration, model_path: str | os.PathLike, device: torch.device,
                 dtype: torch.dtype, on_bytes: Callable[[int], None] | None = None) -> None:
    """Stream every tensor of a float checkpoint into `model` (built on meta) as `dtype` on `device`, with full
    key/shape/dtype/finiteness checks; on_bytes as in load_checkpoint."""
    load_checkpoint(model, model_path, LoadPolicy(model, device, dtype), on_bytes)
