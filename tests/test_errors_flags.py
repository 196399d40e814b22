"""The CLI's error catalogue (docs/errors.md), flag rows: bad flag values, unknown or mistyped flags, missing required
flags, --output_image paths that cannot be written, a glob that matches nothing, a CUDA device on a machine
without one. Each is refused before the model loads with exactly one "error:" line naming the flag and exit 2;
text flags reach the model verbatim (never parsed as Python literals).

The cases run the command line's cli() in this process: the catalogue's runs through tests/cli_runs.py (`cli_job`
at the end), the output-file flags with the model loader replaced by a failure, which proves they are refused
before loading.
"""

from pathlib import Path

import pytest
import torch
from bad_input import FAST, assert_error, fail, jpg_fixture
from cli_runs import cli_run

import inference

jpg = jpg_fixture(1)

FLAG_CASES = {
    "max-tokens-0": (["--max_tokens_to_generate", "0"], "--max_tokens_to_generate must be a positive integer"),
    "max-tokens-negative": (["--max_tokens_to_generate", "-3"], "--max_tokens_to_generate must be a positive"),
    "max-tokens-float": (["--max_tokens_to_generate", "2.5"], "--max_tokens_to_generate must be a positive"),
    "temperature-negative": (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    "top-p-0": (["--top_p", "0"], "--top_p must be a number in (0, 1], got 0"),
    "top-p-above-1": (["--top_p", "1.5"], "--top_p must be a number in (0, 1], got 1.5"),
    "top-k-negative": (["--top_k", "-1"], "--top_k must be an integer >= 0, got -1"),
    "do-sample-maybe": (["--do_sample", "maybe"], "--do_sample must be True or False, got 'maybe'"),
    "seed-text": (["--seed", "abc"], "--seed must be an integer in [0, 2**64)"),
    "debug-text": (["--debug", "yes please"], "--debug must be True or False"),
    "unknown-device": (["--device", "tpu"], "unknown device 'tpu'"),
    "unknown-dtype": (["--dtype", "int8"], "unknown dtype 'int8'; use float32, bfloat16 or float16"),
    "only-cpu-vs-device": (["--only_cpu", "True", "--device", "cuda"], "--only_cpu True contradicts --device cuda"),
    "unknown-flag": (["--foo", "1"], "unknown flag --foo"),
    "mistyped-flag": (["--top-pp", "0.5"], "unknown flag --top_pp; did you mean --top_p?"),
    "single-dash": (["-x"], "unknown option -x"),
    "flag-without-value": (["--top_p"], "--top_p needs a value"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
@cli_run("flag", "case")
def test_bad_flag(cli_result, case):
    run, _ = cli_result
    assert_error(run, 2, FLAG_CASES[case][1])
    assert "loaded" not in run.stderr  # refused before loading anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@cli_run("cuda")
def test_cuda_requested_without_cuda(cli_result):
    assert_error(cli_result[0], 2, "device 'cuda' requested but CUDA is not available; use --device cpu")


@pytest.mark.parametrize("missing", ["--model_path", "--image_file_path"])
@cli_run("missing", "missing")
def test_missing_required_flag(cli_result, missing):
    assert_error(cli_result[0], 2, f"{missing} is required")


# Flags of the many-images / output features: checked in-process through inference.cli (the same path the
# command line takes) with the model loader replaced by a failure, which proves they are refused before loading.
def _new_flag_cases(jpg, tmp):
    two = [str(jpg), str(jpg.parent / "other.jpg")]
    return {
        "batch-size-0": (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
        "batch-size-float": (["--batch_size", "2.5"], "--batch_size must be a positive integer, got 2.5"),
        "stream-maybe": (["--stream", "maybe"], "--stream must be True or False, got 'maybe'"),
        "json-yes": (["--json", "yes"], "--json must be True or False, got 'yes'"),
        "verbose-2": (["--verbose", "2"], "--verbose must be True or False, got 2"),
        "compile-maybe": (["--compile", "maybe"], "--compile must be True or False, got 'maybe'"),
        "output-unknown-ext": (["--output_image", tmp / "out.xyz"], "Pillow cannot write .xyz; use .png or .jpg"),
        "output-no-ext": (["--output_image", tmp / "out"], "Pillow cannot write files without an extension"),
        "output-missing-dir": (["--output_image", tmp / "nope" / "o.png"], f"directory {tmp / 'nope'} does not exist"),
        "output-is-dir": (["--output_image", tmp], "is a directory; give a file name such as"),
        "output-is-input": (["--output_image", jpg], f"--output_image {jpg} is the input image"),
        "output-not-dir-for-many": (["--image_file_path", *two, "--output_image", tmp / "o.png"],
                                    "must be an existing directory when several images are given"),
        "output-same-names": (["--image_file_path", tmp / "a" / "x.jpg", tmp / "b" / "x.png", "--output_image", tmp],
                              "would both be drawn to"),
        "glob-no-match": (["--image_file_path", tmp / "*.nothing"], "no files match --image_file_path"),
    }


NEW_FLAG_CASES = list(_new_flag_cases(Path("i.jpg"), Path("t")))


@pytest.mark.parametrize("case", NEW_FLAG_CASES)
def test_bad_new_flag(ckpt, jpg, tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(inference, "load_hf_model", fail(AssertionError("the model must not load")))
    args, needle = _new_flag_cases(jpg, tmp_path)[case]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = ["--model_path", str(ckpt)] + ([] if "--image_file_path" in args else ["--image_file_path", str(jpg)])
    with pytest.raises(SystemExit) as info:
        inference.cli(base + [str(a) for a in args])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_text_flags_are_not_parsed_as_python_literals(ckpt, jpg, monkeypatch, capsys):
    """fire would turn --prompt 1e3 into 1000.0 and [1,2] into a list; the prompt must reach the model verbatim."""
    seen = []
    monkeypatch.setattr(inference, "generate", lambda model, proc, prompts, *a, **k: seen.extend(prompts) or ["ok"])
    for prompt in ["1e3", "[1,2]", "None", "'quoted'", "-5"]:
        inference.cli(["--model_path", str(ckpt), "--image_file_path", str(jpg), "--prompt", prompt])
    assert seen == ["1e3", "[1,2]", "None", "'quoted'", "-5"]
    assert capsys.readouterr().out == "ok\n" * 5


def cli_job(kind: str, case: str, ckpt: Path, jpg: Path, base: Path) -> tuple[list, list[Path]]:
    """(CLI arguments, directories that must stay unchanged) of one run; builds its inputs under base."""
    if kind == "flag":
        return ["--model_path", ckpt, "--image_file_path", jpg, *FAST, *FLAG_CASES[case][0]], []
    if kind == "cuda":
        return ["--model_path", ckpt, "--image_file_path", jpg, "--device", "cuda"], []
    if kind == "missing":
        return (["--image_file_path", jpg] if case == "--model_path" else ["--model_path", ckpt]), []
    raise ValueError(f"unknown kind of CLI run {kind!r}")
