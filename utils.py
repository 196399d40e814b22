"""Strict low-memory safetensors loading of hub-layout PaliGemma checkpoints (config.json parsing is in
configuration_paligemma.py, re-exported here), the tokenizer, and the device/dtype decision
(`resolve_device_dtype`, the one place it is made).

`load_hf_model(path, device)` takes a checkpoint directory or a hub id (`google/paligemma-3b-mix-224`, resolved
through the Hugging Face cache by `resolve_model_path`), reads a sparse hub `config.json` (absent fields take
the real checkpoints' values, listed in ../shared/PALIGEMMA_FACTS.md), builds the model on the meta device,
and streams every tensor from `model.safetensors` or the shards named by `model.safetensors.index.json`
straight into the target device and dtype, so peak memory stays near one copy of the weights. Every key, shape
and dtype is checked; pickled `*.bin` checkpoints are refused (unpickling can run code). A checkpoint is data
only: configs asking for their own code (`auto_map`) are refused and transformers is never allowed to run it,
and the index may name only plain file names beside it, so nothing outside the directory is read.

Checked against: transformers `models/paligemma/configuration_paligemma.py`, `models/gemma*/configuration_*.py`,
`models/siglip/configuration_siglip.py` and its checkpoint conversion scripts (key layouts).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import ops
from configuration_paligemma import (  # noqa: F401 — config parsing lives there; utils re-exports it
    CheckpointError,
    PaliGemmaConfig,
    config_from_dict,
    load_config,
)
from modeling_gemma import PaliGemmaForConditionalGeneration
from processing_paligemma import ProcessorError, image_token_id

# Converting a float32 checkpoint to bf16 (or copying to a GPU) reads through one staging buffer of this many
# bytes, so the 2.1 GB float32 embedding never exists in host memory beside its converted copy.
_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------

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


def weight_files(model_path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one. Refuses pickled weights."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object (tensor name -> shard file); re-download it")
        for key, name in weight_map.items():
            _check_shard_name(index, key, name)
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing; re-download it")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CheckpointError(
            f"{root} holds only pickled weights (*.bin/*.pt); they are refused because unpickling runs code — "
            "download the safetensors files of the checkpoint"
        )
    raise CheckpointError(f"{root} has no model.safetensors or model.safetensors.index.json; download the weights")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


class _ShardReader:
    """Reads tensors of one safetensors file by explicit file reads into a reused staging buffer.

    Used when the stored dtype or device differs from the target. Converting through safetensors' zero-copy
    slices would fault the whole float32 shard into this process's memory map (counted in RSS until the file
    closes, so a float32 checkpoint loaded as bf16 would peak far above the bf16 weights). Plain reads keep the
    peak at the converted weights plus one staging buffer.
    """

    def __init__(self, path: Path):
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        header_len = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(header_len))
        self.data_start = 8 + header_len  # data_offsets are relative to the end of the header
        self.staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        info = self.header[key]
        src_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out = torch.empty(info["shape"], dtype=dtype, device=device)
        flat = out.view(-1)
        per_chunk = _CHUNK_BYTES // src_dtype.itemsize
        offset = self.data_start + info["data_offsets"][0]
        buf = memoryview(self.staging.numpy())
        for start in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - start)
            nbytes = n * src_dtype.itemsize
            self.file.seek(offset + start * src_dtype.itemsize)
            got = 0
            while got < nbytes:  # raw reads may return short
                r = self.file.readinto(buf[got:nbytes])
                if not r:
                    raise CheckpointError(f"{Path(self.file.name).name} ends inside tensor {key}; re-download it")
                got += r
            # safetensors stores little-endian data, which is every platform torch runs on.
            flat[start:start + n].copy_(self.staging[:nbytes].view(src_dtype))
        return out

    def close(self) -> None:
        self.file.close()


def load_weights(model: PaliGemmaForConditionalGeneration, model_path, device: torch.device, dtype: torch.dtype,
                 on_bytes: Callable[[int], None] | None = None):
    """Stream every tensor of the checkpoint into `model` (built on meta) with full key/shape/dtype checks.

    on_bytes (progress): called with each tensor's size in bytes, and with the rest of each shard's file size
    (header, skipped tensors) after it, so the calls add up to the weight files' total size.
    """
    expected = {name: t.shape for name, t in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for path in weight_files(model_path):
        reader: _ShardReader | None = None  # opened on the first tensor that needs converting
        shard_done = 0
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = canonical_key(key)
                    sl = f.get_slice(key)
                    if sl.get_dtype() not in _SAFETENSORS_DTYPES:
                        raise CheckpointError(
                            f"{path.name}: tensor {key} has dtype {sl.get_dtype()}, expected a float type; "
                            "the file is not a PaliGemma weight file"
                        )
                    shape = torch.Size(sl.get_shape())
                    if name is None:  # tied lm_head copy: check it, don't load it
                        emb = expected["language_model.model.embed_tokens.weight"]
                        if shape != emb:
                            raise CheckpointError(f"{path.name}: {key} has shape {tuple(shape)}, expected {tuple(emb)}")
                        continue
                    if name not in expected:
                        raise CheckpointError(
                            f"{path.name}: unexpected tensor {key} (not part of this config's model); "
                            "check config.json matches the weights"
                        )
                    if name in loaded:
                        raise CheckpointError(f"{path.name}: tensor {key} also appears in {where[name]}")
                    if shape != expected[name]:
                        raise CheckpointError(
                            f"{path.name}: tensor {key} has shape {tuple(shape)}, expected {tuple(expected[name])} "
                            "from config.json; the checkpoint and its config disagree"
                        )
                    if _SAFETENSORS_DTYPES[sl.get_dtype()] == dtype and device.type == "cpu":
                        # Zero-copy: the tensor is a view of the file's memory map, paged in on first use.
                        loaded[name] = f.get_tensor(key)
                    else:
                        reader = reader or _ShardReader(path)
                        loaded[name] = reader.read(key, dtype, device)
                    where[name] = path.name
                    if on_bytes is not None:
                        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[sl.get_dtype()].itemsize
                        on_bytes(nbytes)
                        shard_done += nbytes
        except SafetensorError as e:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file ({e}); re-download it") from None
        finally:
            if reader is not None:
                reader.close()
        if on_bytes is not None:
            on_bytes(path.stat().st_size - shard_done)
    missing = [k for k in expected if k not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]}{more} is missing from the weights in {model_path}; re-download")
    # Every key and shape was checked above, so strict=True cannot fail here; assign=True adopts our tensors
    # instead of copying into meta storage.
    model.load_state_dict(loaded, strict=True, assign=True)


# The files AutoTokenizer reads whose top-level "auto_map" makes it import Python code from the checkpoint
# directory (or from another hub repository, "owner/repo--module.Class"): tokenizer_config.json's AutoTokenizer
# entry, and config.json's AutoConfig entry (read through AutoConfig). No PaliGemma checkpoint has either.
_CODE_REFERENCING_FILES = ("tokenizer_config.json", "config.json")


def _refuse_custom_code(root: Path) -> None:
    """A checkpoint directory is data only: refuse one whose tokenizer/model config asks for its own code
    (`auto_map`), before transformers reads it, so nothing is prompted for and nothing is imported."""
    for name in _CODE_REFERENCING_FILES:
        path = root / name
        if not path.exists():
            continue  # config.json was read already; tokenizer_config.json is optional
        if not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; re-download it")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            detail = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"{path} is not valid JSON ({detail}); re-download it") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path} is not a JSON object; re-download it")
        if "auto_map" in cfg:
            shown = json.dumps(cfg["auto_map"], ensure_ascii=True)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            raise CheckpointError(
                f"{path}: auto_map {shown} asks to run code from the checkpoint; checkpoints are loaded as data "
                "only and their code is never run — remove auto_map, or use the original checkpoint's files"
            )


def load_tokenizer(model_path, config: PaliGemmaConfig):
    """The checkpoint's own tokenizer, checked to have `<image>` at the config's image_token_index."""
    from transformers import AutoTokenizer  # heavy import, only when loading

    root = Path(model_path)
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{root} has no tokenizer (tokenizer.json or tokenizer.model); download the checkpoint's tokenizer files"
        )
    _refuse_custom_code(root)
    try:
        # trust_remote_code=False, explicitly: left at None, transformers asks on stdout whether to run the
        # checkpoint's code (and runs it on "y" from stdin). _refuse_custom_code already turned such a checkpoint
        # away; this makes sure transformers never imports from the directory even if it finds another route.
        tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for missing/broken files
        raise CheckpointError(
            f"cannot load the tokenizer from {model_path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "the directory needs tokenizer.json or tokenizer.model with tokenizer_config.json"
        ) from None
    try:
        image_id = image_token_id(tok)
    except ProcessorError:
        raise CheckpointError(
            f"the tokenizer in {model_path} has no <image> token; use the checkpoint's own tokenizer") from None
    if image_id != config.image_token_index:
        raise CheckpointError(
            f"the tokenizer maps <image> to {image_id} but config.json says image_token_index "
            f"{config.image_token_index}; tokenizer and config come from different checkpoints"
        )
    return tok


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device_dtype(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                         quantize: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The one place device and dtype are decided (the CLI and load_hf_model both ask here).

    device: None or "auto" -> CUDA, else MPS, else CPU; an explicit device that is not available is an error.
    dtype: None -> float32 on CPU (exact, the parity-tested mode; bfloat16 is faster), bfloat16 on CUDA and MPS
    and for an int8 model's float parts (quantize="int8": its kernel takes bf16 activations); otherwise a name
    from DTYPES or a torch float dtype. Raises ValueError with one line for what does not exist.
    """
    if device is None or str(device) == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                           else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu")
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" and not quantize else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return dev, DTYPES[str(dtype)]


# owner/name as the hub spells repo ids: letters, digits, "-", "_", "." (no "--" or ".."), at most 96 each.
_HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
# What a checkpoint needs: weights, config/index/tokenizer JSON, the SentencePiece model. Never *.bin, *.pt.
HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model"]


def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """A local path as it is; a hub id (`owner/name` that is not an existing local path) -> the directory of its
    snapshot in the Hugging Face cache, downloading only HUB_FILES when they are not cached yet.

    The cache and the mode follow huggingface_hub's environment: HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (use
    the cache only), HF_TOKEN (gated checkpoints). Raises CheckpointError with one line for an id that is not
    cached while offline or while the hub cannot be reached, not found, gated, or failing to download.
    """
    text = os.fspath(model_path)
    if Path(text).exists() or not _HUB_ID.fullmatch(text):
        return Path(text)  # a local directory always wins over a hub id of the same spelling
    from huggingface_hub import constants, snapshot_download  # only when a hub id is used: a slow import
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise CheckpointError(f"{text} is gated on the Hugging Face hub: accept its licence at https://huggingface.co/"
                              f"{text} and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text} is neither a local directory nor a model on the Hugging Face hub (a private "
                              "one needs a login: `hf auth login` or HF_TOKEN); check the spelling") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x: a partial earlier download
            raise CheckpointError(f"the cached copy of {text} in {cache} is incomplete and the hub "
                                  "cannot be reached to complete it; retry with network access") from None
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"{text} is not a local directory, and the Hugging Face cache ({cache}) has no copy of it while "
                "HF_HUB_OFFLINE=1 forbids downloading; download it once with network access (or unset "
                "HF_HUB_OFFLINE), or give a checkpoint directory") from None
        cause = e.__cause__ or e
        raise CheckpointError(
            f"{text} is not a local directory, the Hugging Face cache ({cache}) has no copy of it, and the hub "
            f"cannot be reached ({type(cause).__name__}); check the network, or give a checkpoint directory") from None
    except HfHubHTTPError as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"downloading {text} from the Hugging Face hub failed ({detail}); retry, or give a "
                              "downloaded checkpoint directory") from None


def load_hf_model(model_path: str | os.PathLike, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype | None = None, progress: bool = True,
                  pack: bool | None = False, quantize: str | None = None
                  ) -> tuple[PaliGemmaForConditionalGeneration, Any]:
    """Load a PaliGemma checkpoint -> (model in eval mode, tokenizer).

    model_path: a directory in the hub layout, or a hub id such as "google/paligemma-3b-mix-224" (see
    resolve_model_path; a local directory of that name wins). device: "cpu", "cuda", "mps", or None for the best
    available. dtype: default float32 on CPU, bfloat16 on CUDA/MPS. progress: a loading bar on stderr. pack:
    repack bf16 CPU weights for oneDNN (ops.pack_linear_weights: faster decode, same results, inference
    only, the weights become opaque; the CLI passes None); None = where it pays (ops.packing_pays: bf16 onto a
    CPU with bf16 arithmetic, oneDNN switched on). Default False: notebooks get ordinary dense weights.
    quantize: "int8" = int8 weight-only (quantize.py; from a float checkpoint at load time); None = as stored (a
    checkpoint written by quantize.save_int8_checkpoint loads as int8).
    Raises CheckpointError (a ValueError) naming the file and key for anything that does not fit.
    """
    root = resolve_model_path(model_path)
    if not root.exists():
        raise CheckpointError(
            f"model path {root} does not exist; give a downloaded checkpoint directory or a hub id such as "
            "google/paligemma-3b-mix-224")
    if not root.is_dir():
        raise CheckpointError(f"model path {root} is a file; give the checkpoint directory that contains it")
    import quantize as quantization  # here, not at the top: quantize.py builds on this module

    int8 = quantization.check_method(quantize) == "int8" or quantization.is_int8_checkpoint(root)
    dev, dt = resolve_device_dtype(device, dtype, "int8" if int8 else None)
    config = load_config(root)
    tokenizer = load_tokenizer(root, config)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    if int8:
        quantization.use_int8_modules(model)
    total = sum(f.stat().st_size for f in weight_files(root))
    # disable= only when asked: an explicit value would override the TQDM_DISABLE environment variable. The
    # with-block closes the bar, ending its line, also when loading fails: the error starts a line of its own.
    with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, file=sys.stderr,
              **({} if progress else {"disable": True})) as bar:
        (quantization.load_int8_weights if int8 else load_weights)(model, root, dev, dt, bar.update)
    model.eval().requires_grad_(False)
    if pack is None:
        pack = ops.packing_pays(dev, dt)
    if pack:
        ops.pack_linear_weights(model)
    return model, tokenizer
