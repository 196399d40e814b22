"""The float and int8 loaders are one loop (weights.load_checkpoint) with two policies: a defect of a float
checkpoint gets the same refusal from both, and both report progress adding up to the weight files' size."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize
import weights
from modeling_gemma import PaliGemmaForConditionalGeneration
from utils import CheckpointError, load_config, load_hf_model


def _first(shards, keep):
    """The tensors of the first shard holding a key keep() accepts, and that key (the first in sorted order)."""
    for tensors in shards.values():
        keys = sorted(k for k in tensors if keep(k, tensors[k]))
        if keys:
            return tensors, keys[0]
    raise AssertionError("no tensor of the tiny checkpoint fits")


def _tied_head_of_wrong_shape(shards):
    next(iter(shards.values()))["lm_head.weight"] = torch.zeros(2, 2)
    return r"lm_head.weight has shape \(2, 2\), expected"


def _same_tensor_in_both_layouts(shards):
    tensors, key = _first(shards, lambda k, t: True)  # a legacy (hub) name
    new = ("model.language_model." + key.removeprefix("language_model.model.") if key.startswith("language_model.")
           else "model." + key)  # its transformers-5 name, which maps onto the same parameter
    assert weights.canonical_key(new) == weights.canonical_key(key)
    tensors[new] = tensors[key].clone()
    return r"also appears in model-0000\d-of"


def _nan_in_a_matrix(shards):
    tensors, key = _first(shards, lambda k, t: k.endswith("proj.weight"))  # a matrix the int8 loader quantizes
    tensors[key][0, 0] = float("nan")
    return f"tensor {key} holds NaN"


def _infinity_in_a_matrix(shards):
    tensors, key = _first(shards, lambda k, t: k.endswith("proj.weight"))
    tensors[key][-1, -1] = -float("inf")
    return f"tensor {key} holds an infinite value"


def _wrong_shape(shards):
    tensors, key = _first(shards, lambda k, t: t.ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    return f"tensor {key} has shape"


@pytest.mark.parametrize("quantize_as", [None, "int8"])
@pytest.mark.parametrize("damage", [_tied_head_of_wrong_shape, _same_tensor_in_both_layouts, _nan_in_a_matrix,
                                    _infinity_in_a_matrix, _wrong_shape])
def test_both_loaders_refuse_a_damaged_float_checkpoint_alike(ckpt, tmp_path, damage, quantize_as):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    shards = {path: load_file(str(path)) for path in weights.weight_files(dst)}
    message = damage(shards)
    for path, tensors in shards.items():
        save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(dst, "cpu", quantize=quantize_as, progress=False)


@pytest.mark.parametrize("int8", [False, True])
def test_progress_adds_up_to_the_weight_files(ckpt, int8):
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(ckpt))
    if int8:
        quantize.use_int8_modules(model)
    seen: list[int] = []
    load = quantize.load_int8_weights if int8 else weights.load_weights
    load(model, ckpt, torch.device("cpu"), torch.float32, seen.append)
    assert sum(seen) == sum(f.stat().st_size for f in weights.weight_files(ckpt))
    assert all(n >= 0 for n in seen) and len(seen) > len(weights.weight_files(ckpt))
