"""Loading hub-layout PaliGemma checkpoints: `load_hf_model` puts together config.json parsing
(configuration_paligemma.py), strict low-memory weight reading (weights.py; both re-exported here), the
tokenizer, and the device/dtype decision (`resolve_device_dtype`, the one place it is made).

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
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
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
from weights import canonical_key, load_weights, weight_files  # noqa: F401 — re-exported: utils' API before the split

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
            "the directory needs tokenizer.json, or a valid SentencePiece tokenizer.model, with tokenizer_config.json "
            "— re-download them"
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
          "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}  # float64: for tight parity tests from Python; slow, never needed to run


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
        if dev.type not in ("cpu", "cuda", "mps"):  # meta holds no data; xpu, hpu, ... are not supported
            raise ValueError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu")
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" and not quantize else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16, torch.float16 or "
                             "torch.float64")
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


def loads_as_int8(root: str | os.PathLike, quantize: str | None) -> bool:
    """Whether the checkpoint directory `root` loads with int8 weights: quantize="int8", or a checkpoint saved by
    quantize.py (whatever `quantize` says). The one place this is decided: load_hf_model, and the command line
    before it loads (an int8 model's float parts default to bfloat16, see resolve_device_dtype)."""
    import quantize as quantization  # here, not at the top: quantize.py builds on this module

    return quantization.check_method(quantize) == "int8" or quantization.is_int8_checkpoint(root)


def load_hf_model(model_path: str | os.PathLike, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype | None = None, progress: bool = True,
                  pack: bool | None = False, quantize: str | None = None
                  ) -> tuple[PaliGemmaForConditionalGeneration, Any]:
    """Load a PaliGemma checkpoint -> (model in eval mode, tokenizer).

    model_path: a directory in the hub layout, or a hub id such as "google/paligemma-3b-mix-224" (see
    resolve_model_path; a local directory of that name wins). device: "cpu", "cuda", "mps", or None for the best
    available. dtype: default float32 on CPU, bfloat16 on CUDA/MPS. progress: a loading bar on stderr. pack:
    repack bf16 CPU weights for oneDNN (ops.pack_linear_weights: faster decode, same results, inference only, the
    weights become opaque; ~5-7 s of load, so the CLI passes None only for runs of ops.PACK_MIN_ANSWERS images or
    more); None = where the CPU can (ops.packing_pays: bf16 onto a CPU with bf16 arithmetic, oneDNN switched on).
    Default False: notebooks get ordinary dense weights.
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

    int8 = loads_as_int8(root, quantize)
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
