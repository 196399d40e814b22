"""The CLI, run as a subprocess with the seed's exact flags, prints what greedy generation in Python prints."""

import pytest
import torch
from conftest import CHECKPOINTS, cli_in_process, random_image, run_cli

import quantize
from inference import generate, load_image, make_processor
from utils import load_hf_model


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_seed_command_prints_greedy_text(checkpoint, tmp_path, name):
    path = checkpoint(name)
    image = tmp_path / "img.jpg"
    random_image(42, (80, 60)).save(image)
    run = run_cli("--model_path", path, "--prompt", "caption en", "--image_file_path", image,
                  "--max_tokens_to_generate", "100", "--temperature", "0.8", "--top_p", "0.9", "--do_sample", "False",
                  "--only_cpu", "True")
    assert run.returncode == 0, run.stderr
    model, tok = load_hf_model(path, "cpu")
    expected = generate(model, make_processor(model, tok), ["caption en"], [load_image(str(image))], 100)[0]
    assert expected.strip(), "greedy output should not be empty on the fixture"
    assert run.stdout == expected + "\n"
    assert "loaded" in run.stderr  # diagnostics go to stderr, never stdout


def test_saved_int8_checkpoint_runs_as_the_library_loads_it(ckpt, tmp_path, capsys):
    """A checkpoint written by quantize.py is int8 without --quantize: the command line decides its dtype as
    load_hf_model does (bfloat16 float parts), so the answers are the library's (it used to run them in float32)."""
    int8, _ = load_hf_model(ckpt, "cpu", quantize="int8", progress=False)
    saved = quantize.save_int8_checkpoint(int8, ckpt, tmp_path / "int8")
    image = tmp_path / "img.png"
    random_image(5, (60, 40)).save(image)
    model, tok = load_hf_model(saved, "cpu", progress=False)
    want = generate(model, make_processor(model, tok), ["caption en"], [load_image(str(image))], 12)[0]
    code, out, err = cli_in_process(capsys, "--model_path", saved, "-p", "caption en", "-i", image,
                                    "--max_tokens_to_generate", 12, "--stream", "False")
    assert code == 0 and f"loaded {saved} on cpu as torch.bfloat16" in err, err
    assert out == want + "\n" and model.dtype == torch.bfloat16


def test_bad_flag_is_one_error_line(ckpt, tmp_path):
    run = run_cli("--model_path", ckpt, "--prompt", "x", "--image_file_path", tmp_path / "none.jpg", "--top_p", "0")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --top_p must be a number in (0, 1], got 0"]


def test_compile_on_cpu_runs_eager_with_a_note(ckpt, tmp_path):
    """--compile pays only with CUDA graphs; on the CPU the flag is accepted, said to be ignored, and the answer is
    the eager one."""
    image = tmp_path / "img.jpg"
    random_image(7, (50, 50)).save(image)
    base = ["--model_path", ckpt, "--image_file_path", image, "--max_tokens_to_generate", "8", "--stream", "False"]
    eager = run_cli(*base)
    compiled = run_cli(*base, "--compile", "True")
    assert compiled.returncode == 0, compiled.stderr
    assert "note: --compile pays only on CUDA (CUDA graphs); running eager on cpu" in compiled.stderr
    assert compiled.stdout == eager.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_on_stdout_with_required_flags_defaults_examples_and_exit_codes(flag):
    run = run_cli(flag, env={"PAGER": "false"})  # a pager would fail the run
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
