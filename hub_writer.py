"""Writing a checkpoint in the Hugging Face hub's layout: safetensors shards + model.safetensors.index.json, with
config.json, the tokenizer files and the processor/generation configs copied from the checkpoint trained from.

The shard writer (`plan_shards`, `write_shards`) is shared with the test fixtures and the benchmark checkpoint
(tests/hub_layout.py re-exports it), so the files finetune.py saves are laid out exactly like the ones every test
run loads with both our loader and transformers'. Weights are saved under the legacy hub key names
(`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`), which are our module paths; the LM head
stays tied (no `lm_head.weight`), as on the hub.

Checked against: transformers `modeling_utils.save_pretrained` (shard names, index format, 5 GB shards) and the
google/paligemma-3b-* repositories' file lists; tests/test_finetune.py loads what this writes with transformers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

HUB_MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's default max_shard_size="5GB"
# Files of a checkpoint that are not weights, copied as they are (those the source has).
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json")


def write_json(path: Path, obj, indent: int | None = 2, newline: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + ("\n" if newline else ""), encoding="utf-8")


def plan_shards(sizes: dict[str, int], n_shards: int = 3) -> list[list[str]]:
    """Split the keys (name -> bytes), in order, into n_shards contiguous non-empty groups. When the total needs
    exactly n_shards shards of 5 GB (paligemma-3b-* in float32) they are packed greedily up to 5 GB, as
    save_pretrained does; otherwise the bytes are split evenly (each key goes where its middle byte falls)."""
    total = sum(sizes.values())
    hub_like = math.ceil(total / HUB_MAX_SHARD_BYTES) == n_shards
    groups: list[list[str]] = [[]]
    acc = 0  # bytes in the current group
    done = 0  # bytes in closed groups
    for i, (k, s) in enumerate(sizes.items()):
        if hub_like:
            full = acc + s > HUB_MAX_SHARD_BYTES
        else:
            full = done + acc + s / 2 > total * len(groups) / n_shards
        few_left = len(sizes) - i < n_shards - len(groups) + 1  # each remaining group still needs a key
        if groups[-1] and (full or few_left) and len(groups) < n_shards:
            groups.append([])
            done += acc
            acc = 0
        groups[-1].append(k)
        acc += s
    if len(groups) != n_shards or not all(groups):
        raise RuntimeError(f"could not split {len(sizes)} tensors into {n_shards} shards: {[len(g) for g in groups]}")
    return groups


def write_shards(out: Path, groups: list[list[str]], tensors_of: Callable[[list[str]], dict[str, torch.Tensor]],
                 log: Callable[[str], None] | None = None) -> int:
    """model-0000N-of-0000M.safetensors, one per group (tensors_of(keys) makes that shard's tensors, so only one
    shard is in memory at a time; each file is written under a temporary name and renamed), then
    model.safetensors.index.json. Returns the total tensor bytes."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for n, keys in enumerate(groups, 1):
        t0 = time.perf_counter()
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: t.contiguous() for k, t in tensors_of(keys).items()}
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
        t1 = time.perf_counter()
        tmp = out / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        del tensors
        weight_map.update(dict.fromkeys(keys, fname))
        total += nbytes
        if log is not None:
            log(f"  {fname}: {len(keys)} tensors, {nbytes / 1e9:.3f} GB (generate {t1 - t0:.1f}s, "
                f"write {time.perf_counter() - t1:.1f}s)")
    write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return total


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir; on success it becomes out_dir (an existing one is replaced only
    then), on an exception it is removed. So a checkpoint directory is whole or absent, never half-written."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_model(model: torch.nn.Module, source_dir: str | os.PathLike, directory: Path) -> None:
    """`model`'s weights (in their dtype) as hub shards + index in `directory`, and `source_dir`'s side files, with
    config.json's dtype set to the weights'."""
    source = Path(source_dir)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    groups = plan_shards(sizes, max(1, math.ceil(sum(sizes.values()) / HUB_MAX_SHARD_BYTES)))
    write_shards(directory, groups, lambda keys: {k: state[k].cpu() for k in keys})
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("torch_dtype", "dtype"):  # the dtype the weights are saved in (transformers 4 / 5 spelling)
        if key in config:
            config[key] = dtype
    write_json(directory / "config.json", config)


def save_checkpoint(model: torch.nn.Module, source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """write_model into out_dir, whole or not at all (atomic_directory). Returns out_dir."""
    with atomic_directory(out_dir) as tmp:
        write_model(model, source_dir, tmp)
    return Path(out_dir)
