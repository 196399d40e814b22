"""Hostile run-time input beyond the error catalogue: odd devices, out-of-range or non-UTF-8 flag values and
prompts, a closed or full stdout, SIGTERM, SIGHUP and Ctrl-C (also during the imports). Each ends in exit 0 or
exactly one "error:" line with exit 2 (128 + N for a signal), no traceback, no library warning; extreme but valid
sampling values give the greedy answer.

The flag cases run in-process (`cli_in_process`, the same code path as the command line without interpreter
start-up); the ones about file descriptors, signals and warnings run `inference.py` as subprocesses.
"""

import signal
import subprocess
import time

import pytest
import torch
from bad_input import FAST, error_line, jpg_fixture, one_error
from conftest import cli_command, cli_in_process, random_image, run_cli

import cli_checks

jpg = jpg_fixture(3)


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


def test_stdout_closed_or_full(ckpt, jpg):
    base = " ".join(f"'{a}'" for a in cli_command("--model_path", ckpt, "-i", jpg, "-p", "x", *FAST))
    closed = subprocess.run(["bash", "-c", base + " >&-"], capture_output=True, text=True, timeout=180)
    one_error(closed.returncode, "", closed.stderr, 2, "stdout is closed")
    with open("/dev/full", "w") as full:
        run = subprocess.run(cli_command("--model_path", ckpt, "-i", jpg, "-p", "x", *FAST), stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=180)
    one_error(run.returncode, "", run.stderr, 2, "cannot write the answer to stdout", "No space left")
    assert "Warning" not in run.stderr and "warn" not in run.stderr.lower()  # a valid run up to the write


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
    assert code == 130, err
    error_line(err, "interrupted")


def test_valid_run_has_no_library_warnings(ckpt, jpg):
    run = run_cli("--model_path", ckpt, "-i", jpg, "-p", "detect x", "--json", *FAST)
    assert run.returncode == 0, run.stderr
    assert "warn" not in run.stderr.lower(), run.stderr


def test_describe_maps_signals():
    assert cli_checks.describe(cli_checks.Stopped(signal.SIGTERM), "loading the model") == (
        143, "stopped by SIGTERM while loading the model")
    assert cli_checks.describe(KeyboardInterrupt(), "generating") == (130, "interrupted while generating")


def test_describe_takes_a_programs_own_out_of_memory_hint():
    """inference.py's advice names its own flags (--dtype, --max_tokens_to_generate); another program (finetune.py)
    passes its own."""
    e = torch.OutOfMemoryError("CUDA out of memory")
    assert cli_checks.describe(e, "training", oom_hint="lower --batch_size") == (
        1, "out of memory while training (CUDA out of memory); lower --batch_size")
    assert cli_checks.describe(e, "loading the model")[1].endswith(
        "; try --dtype bfloat16 (half of float32), a smaller checkpoint, or a device with more memory")
