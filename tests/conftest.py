"""Shared fixtures and helpers: tiny random checkpoints in the hub layout (built once per test session), the
command line run as a subprocess or in-process (and the error catalogue's runs, tests/cli_runs.py), noise images,
and a checkpoint that asks to run its own code."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Under pytest-xdist (`-n 2`, the README's test command) the workers share the cores: each gets its share of threads,
# set before torch is imported (here, in the worker's process) and inherited by the CLI subprocesses the tests start.
# Two workers of two threads on two cores would each wait at every parallel operation for a descheduled thread.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

# name -> make_tiny_checkpoint arguments. Covers both key layouts, MQA and GQA, two image sizes, and Gemma 2.
CHECKPOINTS = {
    "pg1-legacy-mqa-224": dict(variant="pg1", layout="legacy", num_key_value_heads=1),
    "pg1-new-gqa-112": dict(variant="pg1", layout="new", num_key_value_heads=2, image_size=112),
    "pg2-legacy-gqa-224": dict(variant="pg2", layout="legacy", num_key_value_heads=2, sliding_window=8),
    # PaliGemma 2 as the hub ships it: bfloat16 shards, `model.*` keys; 448-style explicit image_size.
    "pg2-new-bf16-112": dict(variant="pg2", layout="new", num_key_value_heads=1, image_size=112,
                             dtype=torch.bfloat16, sliding_window=8),
}
DEFAULT_CHECKPOINT = "pg1-legacy-mqa-224"  # what `ckpt` gives: the tests that need just one checkpoint use it

CLI = ROOT / "inference.py"
CLI_TIMEOUT = 180  # seconds for one subprocess run of the CLI (interpreter start-up, load, a few tokens)


def pytest_configure(config):
    config.addinivalue_line("markers", "cli_run(kind, param): the CLI run a test of test_errors_*.py reads")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> path of that tiny hub-layout checkpoint (built on first use)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), **CHECKPOINTS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def ckpt(checkpoint) -> Path:
    """The default tiny checkpoint (PaliGemma 1, legacy keys, MQA, 224 px). Shared: never write into it (copy it
    first, as the tests of broken checkpoints do)."""
    return checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def runs(request, ckpt, jpg, tmp_path_factory):
    """The CLI runs of this module's selected tests, built by the module's cli_job (tests/cli_runs.py)."""
    from cli_runs import module_runs  # here, not at the top: cli_runs imports this module

    with module_runs(request, ckpt, jpg, tmp_path_factory.mktemp("cli")) as started:
        yield started


@pytest.fixture
def cli_result(request, runs):
    """(CompletedProcess, nothing written to the checkpoint or the working directory) of this test's CLI run."""
    from cli_runs import run_key

    key = run_key(request.node)
    assert key is not None, "cli_result needs a @cli_run(kind, param) mark on the test"
    return runs.start(key).result()


def random_image(seed: int, size=(64, 48), mode="RGB") -> Image.Image:
    """A deterministic noise image (noise, so resizing and colour handling are really exercised)."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


# Greedy ids compared between two code paths (ours and transformers, batched and alone, compiled and eager) can
# only differ at a step whose two best logits are closer than the paths' logit difference, where the CPU's
# summation order picks the winner. Float32 sums in another order stay below TOL = 1e-5 of the largest logit (the
# bound test_parity.py holds us to against transformers), which moves a margin by at most 2 * TOL; a margin above
# NEAR_TIE, 2.5 times that, cannot flip.
NEAR_TIE = 5e-5


def assert_no_near_ties(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, new_ids) -> None:
    """The greedy tokens new_ids (1-D) after one unpadded prompt (1, T) are clear choices: at every step up to the
    first EOS, our logits (teacher-forced, no cache) put the best token more than NEAR_TIE of the largest logit
    above the runner-up. Then comparing those ids with another path's is the same on every CPU; a fixture that
    puts a near tie among them fails here, on every CPU, saying so, instead of failing only on some."""
    new = torch.as_tensor(new_ids).reshape(-1).tolist()
    eos = model.config.eos_token_id
    end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    new = torch.tensor([new[:end]], dtype=input_ids.dtype)
    T = input_ids.shape[1]
    with torch.no_grad():
        logits = model(torch.cat([input_ids, new], 1), pixel_values, prefix_len=T)["logits"][0, T - 1:T - 1 + end]
    best = logits.float().topk(2, dim=-1).values
    margin = (best[:, 0] - best[:, 1]) / logits.float().abs().amax(-1)
    step = int(margin.argmin())
    assert margin[step] > NEAR_TIE, (
        f"near tie at step {step}: the best two logits are {margin[step]:.1e} of the largest apart, within what "
        f"another CPU's summation order may change; pick another prompt or image for this fixture")


def cli_command(*args) -> list[str]:
    """`python inference.py ARGS` as an argv list (paths and numbers turned into strings)."""
    return [sys.executable, str(CLI), *map(str, args)]


def run_cli(*args, cwd=None, env: dict | None = None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """`python inference.py ARGS` as a subprocess, stdout and stderr captured as text. env: variables set on top of
    this process's environment (a value of None removes that variable)."""
    environ = None
    if env is not None:
        environ = {**os.environ, **env}
        environ = {k: v for k, v in environ.items() if v is not None}
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environ)


def run_cli_here(*args, cwd=None) -> subprocess.CompletedProcess:
    """inference.cli(ARGS) in this process, in directory `cwd`, stdout and stderr captured: what run_cli returns,
    without the ~3 s of interpreter start-up and imports. For the tests about what the CLI says, not about the
    process itself (file descriptors, signals, environment read at import: those use run_cli)."""
    import contextlib
    import io

    import inference

    out, err, code = io.StringIO(), io.StringIO(), 0
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            inference.cli([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["inference.cli", *map(str, args)], code, out.getvalue(), err.getvalue())


def cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """inference.cli(ARGS) in this process, the same path as the command line without ~3 s of interpreter start-up
    -> (exit code, stdout, stderr)."""
    import inference

    code = 0
    try:
        inference.cli([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


EVIL_PY = """from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def add_custom_code(path, marker, auto_map=None, where="tokenizer_config.json"):
    """A checkpoint that asks for its own code: `auto_map` in `where`, and an evil.py beside it that writes
    `marker` when imported. tokenizer_class is dropped: naming a transformers class, it would win quietly; without
    it transformers 5 asks "Do you wish to run the custom code? [y/N]" on stdout and imports evil.py on "y"."""
    cfg = json.loads((path / where).read_text())
    cfg["auto_map"] = auto_map or {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (path / where).write_text(json.dumps(cfg))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("tokenizer_class", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (path / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
