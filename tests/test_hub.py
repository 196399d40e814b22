"""--model_path owner/name: resolved through a Hugging Face cache built here in the hub's own layout, never
the network (HF_HUB_OFFLINE=1, or an endpoint on a closed local port); and the shard-loading progress bar."""

import hashlib
import os
import shutil

import pytest
from conftest import ROOT, random_image
from conftest import run_cli as _run_cli
from huggingface_hub import errors as hub_errors

import utils
from inference import generate, load_image, make_processor
from utils import CheckpointError, load_hf_model, resolve_model_path

REPO = "tiny-org/paligemma-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hf_cache(hf_home, repo_id, checkpoint_dir):
    """HF_HOME/hub/models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs, refs/main}:
    what `hf download` leaves behind."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in checkpoint_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def run_cli(args, env_extra, cwd):
    """The CLI with none of this environment's HF_* variables (no real cache, token or endpoint), only env_extra."""
    env = dict.fromkeys((k for k in os.environ if k.startswith("HF_")), None)
    return _run_cli(*args, cwd=cwd, env={**env, **env_extra})


def test_hub_id_runs_from_the_cache_offline(ckpt, tmp_path):
    snapshot = build_hf_cache(tmp_path / "hf", REPO, ckpt)
    image = tmp_path / "img.png"
    random_image(3, (60, 40)).save(image)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = run_cli(["--model_path", REPO, "--prompt", "caption en", "--image_file_path", image,
                   "--max_tokens_to_generate", 20], {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, cwd)
    assert run.returncode == 0, run.stderr
    model, tok = load_hf_model(ckpt, "cpu")
    assert run.stdout == generate(model, make_processor(model, tok), ["caption en"], [load_image(str(image))], 20)[0] \
        + "\n"
    assert f"loaded {REPO} on cpu" in run.stderr
    assert list(cwd.iterdir()) == [] and not (tmp_path / "hf" / "token").exists()
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in ckpt.iterdir())  # nothing added


def test_uncached_id_offline_is_one_line(tmp_path):
    run = run_cli(["--model_path", "google/paligemma-3b-mix-224", "--image_file_path", ROOT / "README.md"],
                  {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}, tmp_path)
    # the image is checked first: make it valid so the hub is what fails
    assert "is not an image file" in run.stderr
    image = tmp_path / "x.png"
    random_image(0).save(image)
    run = run_cli(["--model_path", "google/paligemma-3b-mix-224", "--image_file_path", image],
                  {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        f"error: google/paligemma-3b-mix-224 is not a local directory, and the Hugging Face cache ({tmp_path}/hf/hub) "
        "has no copy of it while HF_HUB_OFFLINE=1 forbids downloading; download it once with network access (or "
        "unset HF_HUB_OFFLINE), or give a checkpoint directory"]


def test_unreachable_hub_is_one_line(tmp_path):
    image = tmp_path / "x.png"
    random_image(0).save(image)
    # Port 9 (discard) on localhost: nothing listens, so the connection is refused at once, off the network.
    run = run_cli(["--model_path", "google/paligemma-3b-mix-224", "--image_file_path", image],
                  {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no copy of it, and the hub cannot be reached" in errors[0], run.stderr


def test_local_directory_wins_and_other_paths_are_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    assert resolve_model_path("org/name") == tmp_path.joinpath("org", "name").relative_to(tmp_path)
    for path in ["a/b/c", "/abs/dir", "name", "./x/y", "x/", "a--b/c", "-a/b", "a/b..c"]:
        assert str(resolve_model_path(path)) == str(utils.Path(path))


def _hub_error(cls, message):
    """A huggingface_hub HTTP error without an HTTP response (their constructor wants one; str() does not)."""
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


@pytest.mark.parametrize("cls, needle", [
    (hub_errors.GatedRepoError, "tiny-org/x is gated on the Hugging Face hub: accept its licence at "
                                "https://huggingface.co/tiny-org/x and log in"),
    (hub_errors.RepositoryNotFoundError, "tiny-org/x is neither a local directory nor a model on the Hugging Face hub"),
    (hub_errors.HfHubHTTPError, "downloading tiny-org/x from the Hugging Face hub failed (500 Server Error"),
])
def test_hub_failures_are_checkpoint_errors(tmp_path, monkeypatch, cls, needle):
    monkeypatch.chdir(tmp_path)

    def fail(repo_id, allow_patterns):
        assert allow_patterns == ["*.safetensors", "*.json", "tokenizer.model"]  # never *.bin / *.pt / the rest
        raise _hub_error(cls, "500 Server Error: something\nsecond line")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(CheckpointError) as info:
        load_hf_model("tiny-org/x")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_shard_loading_shows_a_progress_bar(ckpt, capsys):
    load_hf_model(ckpt, "cpu")
    assert "loading weights" in capsys.readouterr().err
    load_hf_model(ckpt, "cpu", progress=False)
    assert capsys.readouterr().err == ""
