"""The CLI, run as a subprocess with the seed's exact flags, prints what greedy generation in Python prints."""

import os
import subprocess
import sys

import pytest
from conftest import CHECKPOINTS, ROOT, random_image

from inference import generate, load_image, make_processor
from utils import load_hf_model


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_seed_command_prints_greedy_text(checkpoint, tmp_path, name):
    path = checkpoint(name)
    image = tmp_path / "img.jpg"
    random_image(42, (80, 60)).save(image)
    cmd = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(path), "--prompt", "caption en",
           "--image_file_path", str(image), "--max_tokens_to_generate", "100", "--temperature", "0.8",
           "--top_p", "0.9", "--do_sample", "False", "--only_cpu", "True"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model, tok = load_hf_model(path, "cpu")
    expected = generate(model, make_processor(model, tok), ["caption en"], [load_image(str(image))], 100)[0]
    assert expected.strip(), "greedy output should not be empty on the fixture"
    assert run.stdout == expected + "\n"
    assert "loaded" in run.stderr  # diagnostics go to stderr, never stdout


def test_bad_flag_is_one_error_line(checkpoint, tmp_path):
    path = checkpoint("pg1-legacy-mqa-224")
    run = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", str(path), "--prompt", "x",
                          "--image_file_path", str(tmp_path / "none.jpg"), "--top_p", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --top_p must be in (0, 1], got 0"]


def test_compile_on_cpu_runs_eager_with_a_note(checkpoint, tmp_path):
    """--compile pays only with CUDA graphs; on the CPU the flag is accepted, said to be ignored, and the answer is
    the eager one."""
    path = checkpoint("pg1-legacy-mqa-224")
    image = tmp_path / "img.jpg"
    random_image(7, (50, 50)).save(image)
    base = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(path), "--image_file_path", str(image),
            "--max_tokens_to_generate", "8", "--stream", "False"]
    eager = subprocess.run(base, capture_output=True, text=True, timeout=120)
    compiled = subprocess.run(base + ["--compile", "True"], capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    assert "note: --compile pays only on CUDA (CUDA graphs); running eager on cpu" in compiled.stderr
    assert compiled.stdout == eager.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_on_stdout_with_required_flags_defaults_examples_and_exit_codes(flag):
    run = subprocess.run([sys.executable, str(ROOT / "inference.py"), flag], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PAGER": "false"})  # a pager would fail the run
    assert run.returncode == 0 and run.stderr == "", run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("usage: python inference.py --model_path PATH --image_file_path IMAGE")
    assert not run.stdout.startswith("INFO:")
    flag_lines = {line.split("=")[0].split()[-1]: line for line in lines if line.lstrip().startswith(("-", "--"))}
    assert flag_lines["--model_path"].endswith("(required)")
    assert flag_lines["--image_file_path"].endswith("(required)")
    assert flag_lines["--max_tokens_to_generate"].endswith("(default: 100)")
    assert flag_lines["--prompt"].endswith('(default: "")') and "-p, --prompt" in flag_lines["--prompt"]
    assert flag_lines["--stream"].endswith("(default: True)")
    assert sum(line.startswith("  python inference.py --model_path ") for line in lines) == 3
    assert "exit codes:" in run.stdout and "2 bad input" in run.stdout and "130 interrupted" in run.stdout
