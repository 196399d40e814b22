"""Config defaults, both key layouts, dtype handling, and strict loading errors that name the key and file."""

import json
import re
import shutil
import sys

import pytest
import torch
from conftest import add_custom_code
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaConfig as HFConfig

from utils import CheckpointError, canonical_key, config_from_dict, load_hf_model, weight_files

# The text/vision sections exactly as google/paligemma-3b-pt-224 lists them (see PALIGEMMA_FACTS.md).
PG1_3B_224 = {
    "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048, "image_token_index": 257152,
    "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
# PaliGemma 2 3B-448: heads and head_dim absent, eos a list, top-level hidden_size stale (2048 vs 2304).
PG2_3B_448 = {
    "model_type": "paligemma", "bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0,
    "hidden_size": 2048, "image_token_index": 257152, "projection_dim": 2304,
    "text_config": {"hidden_size": 2304, "intermediate_size": 9216, "model_type": "gemma2",
                    "num_hidden_layers": 26, "num_image_tokens": 1024, "num_key_value_heads": 4,
                    "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "image_size": 448, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 1024, "patch_size": 14, "projection_dim": 2304},
}


def test_sparse_pg1_config_takes_real_defaults():
    cfg = config_from_dict(PG1_3B_224)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.head_dim, t.rms_norm_eps, t.rope_theta, t.max_position_embeddings) == (256, 1e-6, 10000.0, 8192)
    assert (v.image_size, v.layer_norm_eps, v.num_image_tokens) == (224, 1e-6, 256)
    assert t.sliding_window is None and t.attn_logit_softcapping is None and t.final_logit_softcapping is None
    assert cfg.eos_token_id == [1] and cfg.image_token_index == 257152 and cfg.projection_dim == 2048
    # transformers fills the same defaults for the same file.
    ref = HFConfig(**PG1_3B_224)
    assert (ref.text_config.head_dim, ref.text_config.rms_norm_eps) == (t.head_dim, t.rms_norm_eps)
    assert ref.vision_config.layer_norm_eps == v.layer_norm_eps and ref.vision_config.image_size == v.image_size


def test_sparse_pg2_config_takes_gemma2_defaults():
    cfg = config_from_dict(PG2_3B_448)
    t = cfg.text_config
    assert (t.num_attention_heads, t.head_dim, t.query_pre_attn_scalar) == (8, 256, 256)
    assert (t.attn_logit_softcapping, t.final_logit_softcapping, t.sliding_window) == (50.0, 30.0, 4096)
    assert t.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert cfg.projection_dim == 2304 and cfg.eos_token_id == [1, 107] and cfg.num_image_tokens == 1024
    ref = HFConfig(**PG2_3B_448).text_config
    assert (ref.num_attention_heads, ref.head_dim, ref.sliding_window) == (8, 256, 4096)
    assert list(ref.layer_types) == t.layer_types


@pytest.mark.parametrize("key, expected", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
    ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
    ("model.vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
    ("model.vision_tower.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
    ("model.multi_modal_projector.linear.weight", "multi_modal_projector.linear.weight"),
    ("lm_head.weight", None),
])
def test_key_layouts_map_to_module_paths(key, expected):
    assert canonical_key(key) == expected


def test_both_layouts_load_the_same_architecture(checkpoint):
    a, _ = load_hf_model(checkpoint("pg1-legacy-mqa-224"), "cpu")
    b, _ = load_hf_model(checkpoint("pg1-new-gqa-112"), "cpu")
    assert a.config.text_config.num_key_value_heads == 1 and b.config.text_config.num_key_value_heads == 2
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in a.parameters())
    assert not any(p.is_meta for p in b.parameters())


def test_three_key_layouts_load_identical_weights(tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    # legacy (hub), model.* (newer saves, here with an lm_head copy), and transformers 5's save_pretrained form.
    models = [
        load_hf_model(make_tiny_checkpoint(tmp_path / layout, layout=layout, include_lm_head=head), "cpu")[0]
        for layout, head in (("legacy", False), ("new", True), ("hf5", True))
    ]
    ref = models[0].state_dict()
    for m in models[1:]:
        sd = m.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_bfloat16_load_converts_every_tensor(ckpt):
    f32, _ = load_hf_model(ckpt, "cpu")
    bf16, _ = load_hf_model(ckpt, "cpu", dtype="bfloat16")
    for (n, p), (_, q) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert q.dtype == torch.bfloat16, n
        assert torch.equal(p.to(torch.bfloat16), q), n


@pytest.fixture
def broken(ckpt, tmp_path):
    """A writable copy of a tiny checkpoint and its first shard's tensors."""
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    shard = weight_files(dst)[0]
    return dst, shard, load_file(str(shard))


def _rewrite(shard, tensors):
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_tensor_is_named(broken):
    path, shard, tensors = broken
    victim = sorted(tensors)[0]
    del tensors[victim]
    _rewrite(shard, tensors)
    with pytest.raises(CheckpointError, match=f"tensor {victim}.* missing"):
        load_hf_model(path, "cpu")


def test_wrong_shape_is_named(broken):
    path, shard, tensors = broken
    victim = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[victim] = torch.zeros(tensors[victim].shape[0] + 1, tensors[victim].shape[1])
    _rewrite(shard, tensors)
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {victim} has shape"):
        load_hf_model(path, "cpu")


def test_unexpected_tensor_is_named(broken):
    path, shard, tensors = broken
    tensors["language_model.model.layers.99.mlp.up_proj.weight"] = torch.zeros(2, 2)
    _rewrite(shard, tensors)
    with pytest.raises(CheckpointError, match="unexpected tensor language_model.model.layers.99.mlp.up_proj.weight"):
        load_hf_model(path, "cpu")


def test_integer_weight_is_refused(broken):
    path, shard, tensors = broken
    victim = sorted(tensors)[0]
    tensors[victim] = tensors[victim].to(torch.int32)
    _rewrite(shard, tensors)
    with pytest.raises(CheckpointError, match=f"{victim} has dtype I32"):
        load_hf_model(path, "cpu")


def test_missing_shard_is_named(broken):
    path, shard, _ = broken
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}, which is missing"):
        load_hf_model(path, "cpu")


def test_pickled_only_checkpoint_is_refused(broken):
    path, _, _ = broken
    for f in path.glob("*.safetensors*"):
        f.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickled"):
        load_hf_model(path, "cpu")


def test_truncated_shard_is_reported(broken):
    path, shard, _ = broken
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        load_hf_model(path, "cpu")


def test_config_errors(broken):
    path, _, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    del cfg["text_config"]["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="text_config.num_hidden_layers is missing"):
        load_hf_model(path, "cpu")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf_model(path, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint is data only: no code from it runs, no file outside it is read (issue 11)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, auto_map", [
    ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    ("tokenizer_config.json", ["evil.EvilTokenizer", None]),  # the legacy list form transformers still reads
    ("tokenizer_config.json", {"AutoTokenizer": ["other/repo--evil.EvilTokenizer", None]}),  # code from another repo
    ("config.json", {"AutoConfig": "evil.EvilConfig"}),
])
def test_checkpoint_code_is_refused_not_run(broken, tmp_path, monkeypatch, where, auto_map):
    path, _, _ = broken
    marker = tmp_path / "code-ran"
    add_custom_code(path, marker, auto_map, where)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail(f"prompted on stdout: {a}"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path / where))}: auto_map .*evil\.Evil.* never run"):
        load_hf_model(path, "cpu")
    assert not marker.exists() and "evil" not in sys.modules
    assert not (path / "__pycache__").exists()


@pytest.mark.parametrize("name", [
    "../other/model-00001-of-00003.safetensors", "../../../../etc/passwd", "/etc/passwd",
    "sub/model-00001-of-00003.safetensors", "sub\\model.safetensors", "..", ".", "", 3, None,
])
def test_index_names_only_files_beside_it(broken, name):
    path, shard, _ = broken
    index = path / "model.safetensors.index.json"
    cfg = json.loads(index.read_text())
    key = next(k for k, v in cfg["weight_map"].items() if v == shard.name)
    cfg["weight_map"][key] = name
    index.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"weight_map entry '{re.escape(key)}' names shard .* not a plain file"):
        weight_files(path)


def test_symlinked_shard_loads(broken, tmp_path):
    """The Hugging Face cache's snapshot files are symlinks into blobs/: the name is checked, not the target."""
    path, shard, tensors = broken
    blob = tmp_path / "blobs" / "5f3c0ffee"
    blob.parent.mkdir()
    shard.rename(blob)
    shard.symlink_to(blob)
    model, _ = load_hf_model(path, "cpu")
    sd = model.state_dict()
    assert all(torch.equal(sd[canonical_key(k)], v) for k, v in tensors.items() if canonical_key(k) is not None)


def test_shard_reader_converts_misaligned_data_and_releases_its_map(tmp_path, monkeypatch):
    # The safetensors format does not promise 4-byte-aligned data: a writer that does not pad its header leaves
    # every float32 tensor at an odd offset, which the reader copies aligned before viewing it as float32.
    import weights

    a, b = torch.randn(3, 5), torch.randn(1000)
    header = {"a": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]},
              "b": {"dtype": "F32", "shape": [1000], "data_offsets": [60, 4060]}}
    raw = json.dumps(header).encode()
    raw += b" " * (5 - len(raw) % 4)  # 8 + len(raw) is 1 mod 4: data starts misaligned
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + a.numpy().tobytes() + b.numpy().tobytes())
    monkeypatch.setattr(weights.ShardReader, "chunk_bytes", 256)  # several chunks per tensor
    released = []
    reader = weights.ShardReader(path)
    monkeypatch.setattr(reader, "release", lambda at, n: released.append((at, n)))
    assert reader.data_start % 4 == 1
    assert torch.equal(reader.read("a", torch.float32, torch.device("cpu")), a)
    assert torch.equal(reader.read("b", torch.bfloat16, torch.device("cpu")), b.to(torch.bfloat16))
    # every byte of both tensors was released once read
    assert sum(n for _, n in released) == 4060 and released[0][0] == reader.data_start
    reader.close()
