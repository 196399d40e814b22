"""Hostile config values beyond the error catalogue: every value of config.json (and of the configs built in
Python) is checked in one place, configuration_paligemma.check_config, whose rules cover every field. Wrong JSON
types, zero, negative, huge, non-finite or disagreeing values, JSON nested too deep, an index whose weight_map is
no object, and a value in range that still drives the network to NaN each end in exactly one "error:" line with
exit 2 naming the file or field, no traceback, no library warning. A hypothesis test mutates a valid config.json
at random and holds every run to that rule (or to exit 0 with an answer).

The CLI cases run in-process (`cli_in_process`, the same code path as the command line without interpreter
start-up) on a copy of the tiny checkpoint whose files link to the original's but for the edited one.
"""

import json
import tempfile
from pathlib import Path

import pytest
from bad_input import FAST, SHARD_1, edit_json, jpg_fixture, linked_copy, one_error, set_field
from conftest import cli_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import configuration_paligemma
from configuration_paligemma import GemmaConfig, PaliGemmaConfig, check_config
from modeling_siglip import SiglipVisionConfig

jpg = jpg_fixture(3)

CONFIG_CASES = [
    ("text_config.num_key_value_heads", 0),
    ("vision_config.patch_size", 0),
    ("vision_config.num_attention_heads", 0),
    ("text_config.num_attention_heads", -3),
    ("vision_config.num_attention_heads", 3),  # does not divide the vision width, 32
    ("image_token_index", "1753"),
    ("eos_token_id", {"a": 1}),
    ("eos_token_id", "1"),
    ("eos_token_id", 1e30),
    ("text_config.head_dim", 32.0),
    ("text_config.head_dim", "32"),
    ("text_config.max_position_embeddings", "8192"),
    ("text_config.layer_types", ["full_attention"]),  # 2 layers
    ("text_config.rms_norm_eps", float("nan")),
    ("text_config.rope_theta", float("nan")),
    ("text_config.rope_theta", 0),
    ("text_config.num_hidden_layers", 10**30),
    ("vision_config.num_channels", 4),
    ("projection_dim", 32),
    ("pad_token_id", 5000),
    ("text_config.rope_parameters", {"rope_type": "linear", "factor": 2.0}),  # refused, never ignored
    ("text_config.rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("text_config.rope_parameters", [10000.0]),
    ("tie_word_embeddings", False),  # a separate LM head would be silently replaced by the embedding
    ("text_config.tie_word_embeddings", False),
]


@pytest.mark.parametrize(("field", "value"), CONFIG_CASES, ids=[f"{f}={v!r}" for f, v in CONFIG_CASES])
def test_bad_config_value_is_named(ckpt, jpg, tmp_path, capsys, field, value):
    bad = linked_copy(ckpt, tmp_path / "ckpt")
    edit_json(bad / "config.json", set_field(field, value))
    line = one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "config.json")
    assert field.split(".")[-1] in line


def test_rope_theta_is_read_where_transformers_5_writes_it():
    """transformers 5 saves text_config.rope_parameters {"rope_theta", "rope_type"}, often without a top-level
    rope_theta: the base must come from there (a wrong base moves every logit), and two different ones are refused."""
    cfg = {"model_type": "paligemma", "vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                        "num_hidden_layers": 1},
           "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}}}
    assert configuration_paligemma.config_from_dict(cfg).text_config.rope_theta == 100.0
    cfg["text_config"]["rope_theta"] = 10000.0
    with pytest.raises(configuration_paligemma.CheckpointError, match="keep one"):
        configuration_paligemma.config_from_dict(cfg)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_too_deep(ckpt, jpg, tmp_path, capsys, name):
    bad = linked_copy(ckpt, tmp_path / "ckpt", copy=(name,))
    (bad / name).write_text("[" * 100_000 + "]" * 100_000)
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, name)


@pytest.mark.parametrize("weight_map", [[SHARD_1], {"a": 3}])
def test_index_weight_map_of_wrong_type(ckpt, jpg, tmp_path, capsys, weight_map):
    bad = linked_copy(ckpt, tmp_path / "ckpt", copy=("model.safetensors.index.json",))
    edit_json(bad / "model.safetensors.index.json", lambda idx: idx.update(weight_map=weight_map))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "weight_map")


def test_non_finite_output_is_named_not_answered(ckpt, jpg, tmp_path, capsys):
    """A config value within its range that still drives the network to NaN (queries scaled by 1e150) gives an
    error line, not an empty answer."""
    bad = linked_copy(ckpt, tmp_path / "ckpt")
    edit_json(bad / "config.json", set_field("text_config.query_pre_attn_scalar", 1e-300))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "NaN or Inf")
    code, out, err = cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--do_sample", *FAST)
    one_error(code, out, err, 2, "NaN or Inf")


def test_every_config_field_has_a_rule():
    """check_config looks each field up in its table: a field added without a rule fails here, not silently."""
    for cls in (GemmaConfig, SiglipVisionConfig, PaliGemmaConfig):
        names = {f for f in cls.__dataclass_fields__ if f not in ("text_config", "vision_config")}
        assert names == set(configuration_paligemma._RULES[cls]), cls


def test_python_configs_are_checked_too():
    with pytest.raises(ValueError, match="text_config.num_key_value_heads must be"):
        PaliGemmaConfig.from_name("paligemma-3b-224", text=dict(num_key_value_heads=0))
    with pytest.raises(ValueError, match="vision_config.hidden_size .* multiple"):
        PaliGemmaConfig(vision_config=SiglipVisionConfig(num_attention_heads=7))
    for cfg in configuration_paligemma.NAMED_CONFIGS.values():
        check_config(cfg)  # every released architecture passes its own rules


# Values a damaged or hand-edited config.json may hold: wrong JSON types, zero, negative, huge, non-finite,
# near-misses of the right value (32.0 for 32, "32"), and structures where numbers belong.
_WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**31, 2**64, 10**30, 257216, 8192]),
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.text(max_size=4),
    st.lists(st.integers(-2, 3000), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
)
_KNOWN = ["text_config.head_dim", "text_config.rope_theta", "text_config.rms_norm_eps",
          "text_config.sliding_window", "text_config.layer_types", "text_config.query_pre_attn_scalar",
          "text_config.attn_logit_softcapping", "text_config.final_logit_softcapping", "vision_config.image_size",
          "vision_config.layer_norm_eps", "vision_config.num_channels", "image_token_index", "text_config"]


def _config_paths(cfg: dict) -> list[str]:
    paths = [k for k, v in cfg.items() if not isinstance(v, dict)]
    for section in ("text_config", "vision_config"):
        paths += [f"{section}.{k}" for k in cfg[section]]
    return sorted(set(paths) | set(_KNOWN))


@st.composite
def _mutations(draw, paths):
    out = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["delete", "weird", "float", "string"]))
        out.append((path, kind, draw(_WEIRD)))
    return out


def _mutate(cfg: dict, mutations) -> None:
    for path, kind, weird in mutations:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node.get(p), dict) else None
            if node is None:
                break
        if node is None:
            continue
        if kind == "delete":
            node.pop(last, None)
        elif kind == "weird" or last not in node:
            node[last] = weird
        elif kind == "float" and type(node[last]) is int:
            node[last] = float(node[last])  # 64 -> 64.0: JSON-typed near miss
        else:
            node[last] = str(node[last])  # 64 -> "64"


def test_mutated_config_never_crashes(ckpt, jpg, capsys):
    """Any config.json edit ends in an answer (exit 0) or one line naming the problem (exit 2): never exit 1, never
    a traceback, never a warning on stderr."""
    base = json.loads((ckpt / "config.json").read_text())

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_mutations(_config_paths(base)))
    def run(mutations):
        cfg = json.loads(json.dumps(base))
        _mutate(cfg, mutations)
        with tempfile.TemporaryDirectory() as tmp:
            bad = linked_copy(ckpt, Path(tmp) / "ckpt")
            (bad / "config.json").write_text(json.dumps(cfg))
            code, out, err = cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST)
        assert "Traceback" not in err and "Warning" not in err, (mutations, err)
        if code == 0:
            assert out.endswith("\n"), (mutations, out)
        else:
            one_error(code, out, err, 2)

    run()
