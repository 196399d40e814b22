"""The CLI's error catalogue (docs/errors.md), checkpoint rows: a broken config.json, weights, index or tokenizer,
a --model_path that is not a checkpoint directory, and a checkpoint that asks to run its own code.

Every failure must end in exactly one stderr line starting with "error:" that names the cause, exit code 2 and no
traceback, and write nothing into the checkpoint or the working directory. Each broken case is a mutated copy of
one tiny checkpoint, run through the command line's cli() in this process (tests/cli_runs.py; `cli_job` at the
end); the custom-code case runs `inference.py` as a subprocess, since it is about what the process imports.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from bad_input import FAST, SHARD_1, assert_error, edit_first_shard, edit_json, jpg_fixture
from cli_runs import cli_run, snapshot
from conftest import CLI_TIMEOUT, add_custom_code, cli_command

from utils import weight_files

jpg = jpg_fixture(1)


def _edit_config(path, fn):
    edit_json(path / "config.json", fn)


def _first_2d(t):
    return next(k for k in sorted(t) if t[k].ndim == 2)


def _no_image_token(path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        f.write_text(f.read_text().replace("<image>", "<imagX>"))
    (path / "tokenizer.model").unlink()


def _truncate_shard(path):
    shard = weight_files(path)[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def _index_names(path, name_of):
    """Point the index's entries for shard 1 at name_of(path), a name that reaches outside the checkpoint."""
    index = path / "model.safetensors.index.json"
    cfg = json.loads(index.read_text())
    new = name_of(path)
    cfg["weight_map"] = {k: new if v == SHARD_1 else v for k, v in cfg["weight_map"].items()}
    index.write_text(json.dumps(cfg))


def _shard_outside(path):
    """A real copy of shard 1 in a sibling directory: an index that names it would load it (exit 0) unless refused."""
    outside = path.parent / f"{path.name}-outside"
    outside.mkdir()
    shutil.copy(path / SHARD_1, outside / SHARD_1)
    return outside / SHARD_1


def _shard_in_subdir(path):
    (path / "sub").mkdir()
    (path / SHARD_1).rename(path / "sub" / SHARD_1)
    return f"sub/{SHARD_1}"


NOT_PLAIN = "which is not a plain file name in the checkpoint directory (no '/', '..' or absolute path)"


def _only_pickle(path):
    for f in path.glob("*.safetensors*"):
        f.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")


CHECKPOINT_CASES = {
    "no-config": (lambda p: (p / "config.json").unlink(), ["config.json not found"]),
    "config-not-json": (lambda p: (p / "config.json").write_text("{not json"), ["config.json is not valid JSON"]),
    "config-not-object": (lambda p: (p / "config.json").write_text("[1, 2]"), ["is not a JSON object"]),
    "wrong-model-type": (lambda p: _edit_config(p, lambda c: c.update(model_type="llava")),
                         ["model_type is 'llava', not 'paligemma'"]),
    "missing-field": (lambda p: _edit_config(p, lambda c: c["text_config"].pop("num_hidden_layers")),
                      ["text_config.num_hidden_layers is missing"]),
    "field-not-int": (lambda p: _edit_config(p, lambda c: c["vision_config"].update(num_hidden_layers="2")),
                      ["vision_config.num_hidden_layers must be a positive integer up to 1024, got '2'"]),
    "vocab-below-image-token": (lambda p: _edit_config(p, lambda c: c["text_config"].update(vocab_size=2000)),
                                ["image_token_index 2152 does not fit text_config.vocab_size 2000"]),
    "only-pickle": (_only_pickle, ["only pickled weights", "download the safetensors"]),
    "no-weights": (lambda p: [f.unlink() for f in p.glob("*.safetensors*")], ["has no model.safetensors"]),
    "index-not-json": (lambda p: (p / "model.safetensors.index.json").write_text("{"),
                       ["model.safetensors.index.json is not a valid safetensors index"]),
    # Shard names are plain file names beside the index: never a path out of the checkpoint (issue 11).
    "index-parent-dir": (lambda p: _index_names(p, lambda q: f"../{_shard_outside(q).parent.name}/{SHARD_1}"),
                         ["model.safetensors.index.json: weight_map entry",
                          f"names shard '../index-parent-dir-outside/{SHARD_1}'", NOT_PLAIN]),
    "index-absolute": (lambda p: _index_names(p, lambda q: str(_shard_outside(q).resolve())),
                       ["model.safetensors.index.json: weight_map entry", "names shard '/", NOT_PLAIN]),
    "index-etc-passwd": (lambda p: _index_names(p, lambda q: "../../../../etc/passwd"),
                         ["names shard '../../../../etc/passwd'", NOT_PLAIN]),
    "index-subdir": (lambda p: _index_names(p, _shard_in_subdir), [f"names shard 'sub/{SHARD_1}'", NOT_PLAIN]),
    "index-weight-map-list": (lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": []}'),
                              ["model.safetensors.index.json: weight_map must be an object"]),
    "tokenizer-config-not-json": (lambda p: (p / "tokenizer_config.json").write_text("{"),
                                  ["tokenizer_config.json is not valid JSON", "re-download it"]),
    "missing-shard": (lambda p: weight_files(p)[1].unlink(), ["model-00002-of-00003.safetensors, which is missing"]),
    "truncated-shard": (_truncate_shard, ["model-00001-of-00003.safetensors is truncated", "re-download"]),
    "wrong-shape": (lambda p: edit_first_shard(p, lambda t, _: t.update({_first_2d(t): torch.zeros(3, 5)})),
                    ["has shape (3, 5), expected", "config disagree"]),
    "missing-tensor": (lambda p: edit_first_shard(p, lambda t, first: t.pop(first)), ["is missing from the weights"]),
    "extra-tensor": (lambda p: edit_first_shard(
        p, lambda t, _: t.update({"language_model.model.layers.9.x": torch.ones(2)})),
        ["unexpected tensor language_model.model.layers.9.x"]),
    "int-weight": (lambda p: edit_first_shard(
        p, lambda t, _: t.update({k: v.to(torch.int32) for k, v in list(t.items())[:1]})),
        ["has dtype I32; PaliGemma weights are float32, bfloat16 or float16"]),
    "no-tokenizer": (lambda p: [f.unlink() for f in p.glob("tokenizer*")], ["has no tokenizer", "tokenizer.json"]),
    "tokenizer-without-image": (_no_image_token, ["has no <image> token"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
@cli_run("ckpt", "case")
def test_broken_checkpoint(cli_result, case):
    run, unchanged = cli_result
    assert_error(run, 2, *CHECKPOINT_CASES[case][1])
    assert unchanged  # nothing written into a broken checkpoint or the working directory either


def test_checkpoint_code_is_never_run_whatever_stdin_says(ckpt, jpg, tmp_path):
    path, marker, modules, cwd = tmp_path / "ckpt", tmp_path / "code-ran", tmp_path / "hf-modules", tmp_path / "cwd"
    shutil.copytree(ckpt, path)
    add_custom_code(path, marker)
    cwd.mkdir()
    before = snapshot(path)
    run = subprocess.run(cli_command("--model_path", path, "--image_file_path", jpg, "--max_tokens_to_generate", 2),
                         input="y\n", capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=cwd,
                         env={**os.environ, "HF_MODULES_CACHE": str(modules)})
    # One line on stderr, nothing on stdout (no "[y/N]" prompt there), exit 2.
    assert_error(run, 2, f"{path / 'tokenizer_config.json'}: auto_map", "evil.EvilTokenizer",
                 "their code is never run")
    assert not marker.exists(), "evil.py was imported"
    # Nothing imported from the checkpoint (no __pycache__) and nothing copied to transformers' module cache.
    assert snapshot(path) == before and list(cwd.iterdir()) == []
    assert not list(modules.rglob("evil*"))


@pytest.mark.parametrize("case", ["missing", "file"])
@cli_run("path", "case")
def test_model_path_not_a_directory(cli_result, case):
    run, _ = cli_result
    needle = "does not exist" if case == "missing" else "config.json is a file; give the checkpoint directory"
    assert_error(run, 2, needle)


def cli_job(kind: str, case: str, ckpt: Path, jpg: Path, base: Path) -> tuple[list, list[Path]]:
    """(CLI arguments, directories that must stay unchanged) of one run; builds its inputs under base."""
    if kind == "ckpt":
        path = base / "ckpt" / case
        shutil.copytree(ckpt, path)
        CHECKPOINT_CASES[case][0](path)
        return ["--model_path", path, "--image_file_path", jpg, *FAST], [path]
    if kind == "path":
        model_path = base / "nope" if case == "missing" else ckpt / "config.json"
        return ["--model_path", model_path, "--image_file_path", jpg], []
    raise ValueError(f"unknown kind of CLI run {kind!r}")
