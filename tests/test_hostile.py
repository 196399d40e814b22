"""Hostile and unlucky input beyond the error catalogue: damaged checkpoints (config values, NaN weights, odd
shard files), odd flags and prompts, special files as images, closed or full stdout, signals, and the Python
API's arguments. Every case must end in exit 0 or exactly one "error:" line with exit 2 (128 + N for a signal),
no traceback, no library warning, never a half-written file.

Most CLI cases run in-process (`cli_in_process`, the same code path as the command line without interpreter
start-up); the ones about file descriptors and signals run as subprocesses. A hypothesis test mutates a valid
config.json at random and holds every run to the same rule.
"""

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_command, cli_in_process, random_image, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import cli_checks
import configuration_paligemma
from configuration_paligemma import GemmaConfig, PaliGemmaConfig, check_config
from fileio import atomic_path
from generation import SamplingConfig, generate, generate_ids, make_processor
from modeling_siglip import SiglipVisionConfig
from utils import load_hf_model, resolve_device_dtype, weight_files

FAST = ("--max_tokens_to_generate", "2")


@pytest.fixture(scope="module")
def jpg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "ok.jpg"
    random_image(3, (40, 30)).save(path)
    return path


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


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def one_error(code: int, out: str, err: str, expected_code: int = 2, *needles: str) -> str:
    """exit code, exactly one stderr line starting with "error:" holding every needle, no traceback or warning."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == expected_code, err
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Warning" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------
# config.json: every value checked in one place
# ---------------------------------------------------------------------------------------------------------------

def _set(path: str, value):
    def fn(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return fn


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
]


@pytest.mark.parametrize(("field", "value"), CONFIG_CASES, ids=[f"{f}={v!r}" for f, v in CONFIG_CASES])
def test_bad_config_value_is_named(ckpt, jpg, tmp_path, capsys, field, value):
    bad = linked_copy(ckpt, tmp_path / "ckpt")
    edit_json(bad / "config.json", _set(field, value))
    line = one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "config.json")
    assert field.split(".")[-1] in line


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_too_deep(ckpt, jpg, tmp_path, capsys, name):
    bad = linked_copy(ckpt, tmp_path / "ckpt", copy=(name,))
    (bad / name).write_text("[" * 100_000 + "]" * 100_000)
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, name)


@pytest.mark.parametrize("weight_map", [["model-00001-of-00003.safetensors"], {"a": 3}])
def test_index_weight_map_of_wrong_type(ckpt, jpg, tmp_path, capsys, weight_map):
    bad = linked_copy(ckpt, tmp_path / "ckpt", copy=("model.safetensors.index.json",))
    edit_json(bad / "model.safetensors.index.json", lambda idx: idx.update(weight_map=weight_map))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "weight_map")


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


# ---------------------------------------------------------------------------------------------------------------
# weights and shard files
# ---------------------------------------------------------------------------------------------------------------

def _edit_first_shard(ckpt: Path, dst: Path, fn) -> tuple[Path, str]:
    bad = linked_copy(ckpt, dst, copy=())
    shard = weight_files(bad)[0]
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    fn(tensors, key)
    shard.unlink()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return bad, key


@pytest.mark.parametrize("damage", ["one NaN", "all Inf"])
def test_non_finite_weight_is_named(ckpt, jpg, tmp_path, capsys, damage):
    def fn(tensors, key):
        if damage == "one NaN":
            tensors[key].view(-1)[tensors[key].numel() // 2] = float("nan")
        else:
            tensors[key].fill_(float("inf"))
    bad, key = _edit_first_shard(ckpt, tmp_path / "ckpt", fn)
    kind = "NaN" if damage == "one NaN" else "infinite"
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, key, kind, "damaged")


def test_bfloat16_beyond_float16_range_is_named(checkpoint, jpg, tmp_path, capsys):
    src = checkpoint("pg2-new-bf16-112")
    bad, key = _edit_first_shard(src, tmp_path / "ckpt", lambda t, k: t[k].view(-1).__setitem__(0, 1e10))
    line = one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--dtype", "float16", *FAST), 2, key)
    assert "float16's range" in line
    assert cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--dtype", "bfloat16", *FAST)[0] == 0


def test_float8_tensor_is_named(ckpt, jpg, tmp_path, capsys):
    bad, key = _edit_first_shard(ckpt, tmp_path / "ckpt", lambda t, k: t.__setitem__(k, t[k].to(torch.float8_e4m3fn)))
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


def test_non_finite_output_is_named_not_answered(ckpt, jpg, tmp_path, capsys):
    """A config value within its range that still drives the network to NaN (queries scaled by 1e150) gives an
    error line, not an empty answer."""
    bad = linked_copy(ckpt, tmp_path / "ckpt")
    edit_json(bad / "config.json", _set("text_config.query_pre_attn_scalar", 1e-300))
    one_error(*cli_in_process(capsys, "--model_path", bad, "-i", jpg, *FAST), 2, "NaN or Inf")
    code, out, err = cli_in_process(capsys, "--model_path", bad, "-i", jpg, "--do_sample", *FAST)
    one_error(code, out, err, 2, "NaN or Inf")


# ---------------------------------------------------------------------------------------------------------------
# flags, prompts, images
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "needle"), [
    (("--device", "meta"), "device 'meta'"), (("--device", "xpu"), "device 'xpu'"),
    (("--device", "hpu"), "device 'hpu'"), (("--seed", str(2**64)), "--seed"),
    (("--temperature", "1e309"), "--temperature"), (("--top_p", "1e309"), "--top_p"),
    (("--max_tokens_to_generate", "2.5"), "--max_tokens_to_generate"),
    (("--prompt", "caption \udcff"), "not valid UTF-8"), (("--prompt", "caption <image>"), "<image>"),
    (("--", "--interactive"), "got '--interactive'"), (("--", "--trace"), "got '--trace'"),
])
def test_bad_flag_refused_before_loading(ckpt, jpg, capsys, args, needle):
    code, out, err = cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "x", *args)
    one_error(code, out, err, 2, needle)
    assert "loaded" not in err  # refused before the model load, not after it


@pytest.mark.parametrize("args", [("--temperature", "1e-45"), ("--top_p", "1e-46"), ("--top_k", "1")])
def test_extreme_valid_sampling_values_run(ckpt, jpg, capsys, args):
    code, out, err = cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "x", "--do_sample", *args, *FAST)
    assert code == 0, err
    greedy = cli_in_process(capsys, "--model_path", ckpt, "-i", jpg, "-p", "x", *FAST)[1]
    assert out == greedy  # each of these keeps only the best token: the answer is the greedy one


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


# ---------------------------------------------------------------------------------------------------------------
# stdout, output files, signals (subprocesses: these are about the process's file descriptors and signals)
# ---------------------------------------------------------------------------------------------------------------

def test_stdout_closed_or_full(ckpt, jpg):
    base = " ".join(f"'{a}'" for a in cli_command("--model_path", ckpt, "-i", jpg, "-p", "x", *FAST))
    closed = subprocess.run(["bash", "-c", base + " >&-"], capture_output=True, text=True, timeout=180)
    one_error(closed.returncode, "", closed.stderr, 2, "stdout is closed")
    with open("/dev/full", "w") as full:
        run = subprocess.run(cli_command("--model_path", ckpt, "-i", jpg, "-p", "x", *FAST), stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=180)
    one_error(run.returncode, "", run.stderr, 2, "cannot write the answer to stdout", "No space left")
    assert "Warning" not in run.stderr and "warn" not in run.stderr.lower()  # a valid run up to the write


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


def _stop_midway(args, sig, wait_for: str, timeout=180) -> tuple[int, str]:
    """Start the CLI, send `sig` once its stderr shows `wait_for`, return (exit code, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, deadline = "", time.monotonic() + timeout
    try:
        while wait_for not in err and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
        proc.send_signal(sig)
        err += proc.stderr.read()
        return proc.wait(timeout=60), err
    finally:
        proc.kill()


@pytest.mark.parametrize(("sig", "words"), [(signal.SIGTERM, "stopped by SIGTERM while generating"),
                                            (signal.SIGHUP, "stopped by SIGHUP while generating")])
def test_sigterm_and_sighup_end_like_ctrl_c(ckpt, tmp_path, sig, words):
    for i in range(40):
        random_image(i, (20, 20)).save(tmp_path / f"{i:02d}.png")
    code, err = _stop_midway(cli_command("--model_path", ckpt, "-i", tmp_path, "-b", "1",
                                         "--max_tokens_to_generate", "64"), sig, "loaded ")
    one_error(code, "", err, 128 + sig, words)


def test_ctrl_c_during_the_imports_is_one_line(ckpt, jpg):
    # -X importtime reports each import as it ends: once torch's is reported, the program is inside its imports
    # (or just past them), where Python would print a long traceback for Ctrl-C.
    args = cli_command("--model_path", ckpt, "-i", jpg)
    code, err = _stop_midway([args[0], "-X", "importtime", *args[1:]], signal.SIGINT, "| torch\n")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 130 and len(errors) == 1 and "interrupted" in errors[0] and "Traceback" not in err, err


def test_valid_run_has_no_library_warnings(ckpt, jpg):
    run = run_cli("--model_path", ckpt, "-i", jpg, "-p", "detect x", "--json", *FAST)
    assert run.returncode == 0, run.stderr
    assert "warn" not in run.stderr.lower(), run.stderr


# ---------------------------------------------------------------------------------------------------------------
# Python API: arguments named at the public function
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(ckpt):
    model, tokenizer = load_hf_model(ckpt, progress=False)
    return model, make_processor(model, tokenizer)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(text="x", images=np.zeros((4, 4, 3), np.uint8)), "images must be a PIL.Image.Image"),
    (dict(text="x", images=torch.zeros(3, 4, 4)), "images must be a PIL.Image.Image"),
    (dict(text="x", images="photo.jpg"), "PIL.Image.open"),
    (dict(text="x", images=None), "images must be"),
    (dict(text=None, images="IMAGE"), "text must be"),
    (dict(text=["a", 3], images="IMAGES"), "text must be"),
    (dict(text="see <image>", images="IMAGE"), "<image>"),
])
def test_processor_arguments(tiny, kwargs, needle):
    image = random_image(1)
    kwargs = {k: {"IMAGE": image, "IMAGES": [image, image]}.get(v, v) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=needle.replace("(", r"\(").replace(".", r"\.")):
        tiny[1](**kwargs)


def test_model_arguments(tiny):
    model, processor = tiny
    inputs = processor(text="x", images=random_image(1))
    ids, pv = inputs["input_ids"], inputs["pixel_values"]
    vocab = model.config.text_config.vocab_size
    cases = [
        (dict(input_ids=ids.float(), pixel_values=pv), TypeError, "input_ids must be an integer tensor"),
        (dict(input_ids=ids[0], pixel_values=pv), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=ids.masked_fill(ids == 2, vocab + 5), pixel_values=pv), ValueError, "outside"),
        (dict(input_ids=ids.masked_fill(ids == 2, -1), pixel_values=pv), ValueError, "id -1"),
        (dict(input_ids=ids, pixel_values=pv, attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
        (dict(input_ids=ids, pixel_values=pv[0]), ValueError, "pixel_values must have shape"),
        (dict(input_ids=ids, pixel_values=pv[..., :112, :112]), ValueError, "pixel_values must have shape"),
        (dict(input_ids=ids, pixel_values=pv, kv_cache=model.new_kv_cache(2, 400),
              input_pos=torch.arange(ids.shape[1])), ValueError, "batch size 2"),
        (dict(input_ids=ids, pixel_values=pv, kv_cache=model.new_kv_cache(1, 10),
              input_pos=torch.arange(ids.shape[1])), ValueError, "longer cache"),
    ]
    for kwargs, error, needle in cases:
        with pytest.raises(error, match=needle):
            model(**kwargs)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(top_p=0), "top_p"), (dict(top_p=2), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(temperature=math.inf), "temperature"), (dict(seed=-1), "seed"),
])
def test_sampling_arguments(tiny, kwargs, needle):
    model, processor = tiny
    with pytest.raises(ValueError, match=needle):
        generate(model, processor, "x", random_image(1), **kwargs)
    inputs = processor(text="x", images=random_image(1))
    with pytest.raises(ValueError, match=needle):
        generate_ids(model, inputs["input_ids"], inputs["pixel_values"], **kwargs)
    with pytest.raises(ValueError, match=needle):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(dtype=torch.int8), "dtype torch.int8 is not supported"), (dict(dtype="int8"), "unknown dtype"),
    (dict(device="meta"), "device 'meta' is not supported"),
])
def test_load_arguments(ckpt, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        load_hf_model(ckpt, progress=False, **kwargs)
    with pytest.raises(ValueError, match=needle):
        resolve_device_dtype(kwargs.get("device", "cpu"), kwargs.get("dtype"))


def test_describe_maps_signals():
    assert cli_checks.describe(cli_checks.Stopped(signal.SIGTERM), "loading the model") == (
        143, "stopped by SIGTERM while loading the model")
    assert cli_checks.describe(KeyboardInterrupt(), "generating") == (130, "interrupted while generating")
