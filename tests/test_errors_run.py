"""The CLI's error catalogue (docs/errors.md), rows about the run itself: odd but valid prompts and float16 on CPU
run; a prompt too long for the positions, a closed stdout, running out of memory, an unexpected exception and
Ctrl-C each end in exactly one "error:" line (exit 2 for bad input, 1 for a failure, 130 for Ctrl-C) and no
traceback; --debug shows the real exception.

The catalogue's runs go through tests/cli_runs.py (`cli_job` at the end): the command line's cli() in this
process, but for the closed-stdout case, which runs `inference.py` as a subprocess. Resource failures are
simulated in-process (a real out-of-memory cannot be provoked cheaply).
"""

from pathlib import Path

import pytest
import torch
from bad_input import FAST, assert_error, assert_ok, error_line, fail, jpg_fixture
from cli_runs import CLOSED_STDOUT, cli_run

import inference

jpg = jpg_fixture(1)

PROMPTS = {"empty": "", "unicode-emoji": "¿qué ves? 日本語の説明 🐄🏖️ \u200d"}


@pytest.mark.parametrize("case", list(PROMPTS))
@cli_run("prompt", "case")
def test_empty_and_unicode_prompts_run(cli_result, case):
    run, unchanged = cli_result
    assert_ok(run)
    assert unchanged


@cli_run("float16")
def test_float16_on_cpu_runs_with_a_note(cli_result):
    run, _ = cli_result
    assert_ok(run)
    assert "note: float16 on CPU works but is slow" in run.stderr


@cli_run(CLOSED_STDOUT)
def test_closed_stdout_is_one_line_not_a_traceback(cli_result):
    run, unchanged = cli_result
    assert_error(run, 1, "stdout was closed before the answer was written")
    assert unchanged


@cli_run("too-long")
def test_prompt_too_long_for_the_positions(cli_result):
    assert_error(cli_result[0], 2, "exceeds the model's 8192 positions",
                 "lower max_tokens_to_generate")


@pytest.mark.parametrize("where, exc, code, needles", [
    ("load_hf_model", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 1,
     ["out of memory while loading the model", "--dtype bfloat16"]),
    ("load_hf_model", MemoryError(), 1, ["out of memory while loading the model", "--dtype bfloat16"]),
    ("generate", RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate: out of memory"), 1,
     ["out of memory while generating", "lower --max_tokens_to_generate"]),
    ("generate", KeyError("boom"), 1, ["unexpected KeyError while generating", "rerun with --debug"]),
    ("load_hf_model", KeyboardInterrupt(), 130, ["interrupted while loading the model"]),
])
def test_resource_and_unexpected_failures_are_one_line(ckpt, jpg, monkeypatch, capsys, where, exc, code, needles):
    monkeypatch.setattr(inference, where, fail(exc))
    with pytest.raises(SystemExit) as info:
        inference.main(str(ckpt), "caption en", str(jpg), max_tokens_to_generate=2)
    assert info.value.code == code
    error_line(capsys.readouterr().err, *needles)


def test_debug_shows_the_real_exception(ckpt, jpg, monkeypatch):
    monkeypatch.setattr(inference, "load_hf_model", fail(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        inference.main(str(ckpt), "caption en", str(jpg), debug=True)


def cli_job(kind: str, case: str, ckpt: Path, jpg: Path, base: Path) -> tuple[list, list[Path]]:
    """(CLI arguments, directories that must stay unchanged) of one run; builds its inputs under base."""
    if kind == "prompt":
        return ["--model_path", ckpt, "--image_file_path", jpg, "--prompt", PROMPTS[case], *FAST], [ckpt]
    if kind == "float16":
        return ["--model_path", ckpt, "--image_file_path", jpg, "--dtype", "float16", "--only_cpu", "True", *FAST], \
            [ckpt]
    if kind == CLOSED_STDOUT:
        return ["--model_path", ckpt, "--image_file_path", jpg, *FAST], [ckpt]
    if kind == "too-long":
        return ["--model_path", ckpt, "--image_file_path", jpg, "--max_tokens_to_generate", 8000], []
    raise ValueError(f"unknown kind of CLI run {kind!r}")
