"""--output and --image_list (batch_run.py): torchrun with 2 CPU ranks writes the single process's file byte
for byte; a rank SIGKILLed mid-write is recovered by torchrun's restart; an interrupted run, rerun, redoes its
torn line and nothing else. Every file is compared with the single process's whole file, so a duplicate, a gap
or a line out of order fails.

Equal bytes across runs that batch the images differently need greedy answers that do not depend on the batch:
`clear_choices` checks each image's tokens for near ties first (conftest.assert_no_near_ties, as test_many.py)."""

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input import one_error
from conftest import ROOT, assert_no_near_ties, random_image
from conftest import cli_in_process as cli

import batch_run
import fileio
import inference

N_TOKENS = 6
GOOD = 8  # noise images; the list adds a corrupt one and names the first one twice


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    d = tmp_path_factory.mktemp("list")
    (d / "imgs").mkdir()
    for i in range(GOOD):
        random_image(40 + i, (30 + 7 * i, 60 - 3 * i)).save(d / "imgs" / f"{i}.png")
    (d / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    names = [f"imgs/{i}.png" for i in range(4)] + ["imgs/bad.jpg", "imgs/0.png"] + [
        f"imgs/{i}.png" for i in range(4, GOOD)]
    (d / "list.txt").write_text("\n".join(names) + "\n\n")  # a blank line at the end is skipped
    return d / "list.txt"


def args(ckpt, image_list, output, *more):
    return ("--model_path", ckpt, "--prompt", "caption en", "--image_list", image_list, "--max_tokens_to_generate",
            N_TOKENS, "--output", output, *more)


@pytest.fixture(scope="module")
def clear_choices(ckpt, image_list):
    from utils import load_hf_model

    model, tok = load_hf_model(ckpt, "cpu", progress=False)
    processor = inference.make_processor(model, tok)
    for i in range(GOOD):
        inputs = processor(text=["caption en"], images=[inference.load_image(str(image_list.parent / f"imgs/{i}.png"))])
        ids = inputs["input_ids"], inputs["pixel_values"]
        assert_no_near_ties(model, *ids, inference.generate_ids(model, *ids, inputs["attention_mask"], N_TOKENS)[0])


@pytest.fixture(scope="module")
def expected(ckpt, image_list, tmp_path_factory, clear_choices):
    """The single process's --output file (batches of 3): what every other run must write, byte for byte."""
    path = tmp_path_factory.mktemp("expected") / "single.jsonl"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        inference.cli([str(a) for a in args(ckpt, image_list, path, "--batch_size", 3)])
    assert exit_.value.code == 2 and "error: 1 of 10 images could not be read; their JSON lines in " in err.getvalue()
    assert out.getvalue().startswith(f"{path}: 10 images, 10 answered now") and "1 unreadable" in out.getvalue()
    assert not path.with_name("single.jsonl.parts").exists()
    return path


def test_single_process_output_is_the_stdout_lines(ckpt, image_list, expected, capsys):
    code, stdout_lines, _ = cli(capsys, *args(ckpt, image_list, expected)[:-2], "--batch_size", 4)
    assert expected.read_text() == stdout_lines and code == 2
    records = [json.loads(line) for line in stdout_lines.splitlines()]
    folder = image_list.parent
    assert [r["path"] for r in records] == [str(folder / "imgs" / n) for n in
                                            ["0.png", "1.png", "2.png", "3.png", "bad.jpg", "0.png", "4.png", "5.png",
                                             "6.png", "7.png"]]
    assert set(records[4]) == {"path", "error"} and records[5] == records[0]


def torchrun(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def test_torchrun_two_ranks_write_the_single_process_file(ckpt, image_list, expected, tmp_path):
    out = tmp_path / "dist.jsonl"
    run = torchrun("inference.py", *args(ckpt, image_list, out, "--batch_size", 2))
    assert run.returncode == 0, run.stderr  # an unreadable image is a note under torchrun: exit 2 would restart
    assert out.read_bytes() == expected.read_bytes()
    assert run.stdout.startswith(f"{out}: 10 images, 10 answered now") and "2 processes" in run.stdout
    assert "note: 1 images could not be read" in run.stderr and "Traceback" not in run.stderr
    # Parts and temporary files gone; the settings stay beside the output, so a rerun can check them, and the
    # (empty) lock file that keeps two runs off one output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.jsonl", "dist.jsonl.lock", "dist.jsonl.run.json"]


def test_rank_killed_mid_write_is_restarted_and_resumes(ckpt, image_list, expected, tmp_path):
    """Rank 1 SIGKILLs itself halfway through writing its 2nd batch; torchrun --max-restarts 1 starts both ranks
    again, which cut the torn line, skip what is on disk and finish: the same file, nothing lost or doubled."""
    out = tmp_path / "dist.jsonl"
    run = torchrun("--max-restarts", "1", "tests/kill_rank.py", *args(ckpt, image_list, out, "--batch_size", 2),
                   env={"KILL_RANK": "1", "KILL_AT": "2"})
    assert run.returncode == 0, run.stderr
    assert "failed (exitcode: -9) local_rank: 1" in run.stderr  # torchrun saw the SIGKILL
    assert "rank-00001.jsonl ended in a torn line (killed mid-write)" in run.stderr
    assert out.read_bytes() == expected.read_bytes()
    answered = int(run.stdout.split(" images, ")[1].split(" answered now")[0])
    assert answered <= 10 - 2, run.stdout  # rank 1's first batch was kept, not answered again


def test_interrupted_run_resumes_with_its_torn_line_redone(ckpt, image_list, expected, tmp_path, capsys,
                                                           monkeypatch):
    out = tmp_path / "out.jsonl"
    append, calls = batch_run._append, []

    def append_then_stop(f, data):
        calls.append(data)
        if len(calls) == 2:
            append(f, data[:len(data) // 2])
            raise KeyboardInterrupt
        append(f, data)

    monkeypatch.setattr(batch_run, "_append", append_then_stop)
    code, _, err = cli(capsys, *args(ckpt, image_list, out, "--batch_size", 3))
    assert code == 130 and not out.exists()
    part = tmp_path / "out.jsonl.parts" / "rank-00000.jsonl"
    assert part.read_bytes() == calls[0] + calls[1][:len(calls[1]) // 2]
    kept = part.read_bytes().count(b"\n")  # whole lines: the first batch's 3 and what half of the second holds
    monkeypatch.undo()
    # Another prompt on the same parts would mix two runs' answers: refused, nothing changed.
    code, _, err = cli(capsys, *args(ckpt, image_list, out)[:3], "detect cat", *args(ckpt, image_list, out)[4:])
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "(prompt: 'caption en')" in err, err
    code, stdout, err = cli(capsys, *args(ckpt, image_list, out, "--batch_size", 4))
    assert "ended in a torn line" in err and code == 2
    assert out.read_bytes() == expected.read_bytes()
    assert stdout.startswith(f"{out}: 10 images, {10 - kept} answered now") and f"{kept} from before" in stdout
    assert 3 <= kept < 6
    # Rerun when all is done: nothing to answer, no model loaded, the file untouched.
    code, stdout, err = cli(capsys, *args(ckpt, image_list, out))
    assert "0 answered now" in stdout and "loaded" not in err and out.read_bytes() == expected.read_bytes()


def test_a_run_interrupted_before_the_settings_moved_beside_the_output_resumes(ckpt, image_list, expected,
                                                                              tmp_path, capsys, monkeypatch):
    """Versions before OUT.run.json kept the settings in OUT.parts/run.json, without vae_path: such a run, resumed
    with the same settings, finishes (and its record moves beside the output); with others it is refused."""
    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    append = batch_run._append
    monkeypatch.setattr(batch_run, "_append", lambda f, data: (append(f, data), (_ for _ in ()).throw(
        KeyboardInterrupt)))
    assert cli(capsys, *args(ckpt, image_list, out, "--batch_size", 3))[0] == 130
    monkeypatch.undo()
    old = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    del old["vae_path"]
    (parts / "run.json").write_text(json.dumps(old))
    (tmp_path / "out.jsonl.run.json").unlink()
    code, _, err = cli(capsys, *args(ckpt, image_list, out)[:3], "detect cat", *args(ckpt, image_list, out)[4:])
    assert code == 2 and "(prompt: 'caption en')" in err, err
    code, stdout, _ = cli(capsys, *args(ckpt, image_list, out))
    assert "3 from before" in stdout and out.read_bytes() == expected.read_bytes(), stdout  # exit 2: one bad image
    assert json.loads((tmp_path / "out.jsonl.run.json").read_text())["prompt"] == "caption en"


def test_finished_output_keeps_its_settings(ckpt, image_list, expected, tmp_path, capsys):
    """A finished output keeps its settings beside it (OUT.run.json): a rerun with others is refused before any
    line counts, and so is one whose record is damaged or missing; nothing is changed."""
    out, record = tmp_path / "out.jsonl", tmp_path / "out.jsonl.run.json"
    shutil.copy(expected, out)
    shutil.copy(expected.with_name("single.jsonl.run.json"), record)
    settings = json.loads(record.read_text())
    assert settings["prompt"] == "caption en" and settings["vae_path"] is None and settings["dtype"] == "torch.float32"
    base = args(ckpt, image_list, out)
    code, stdout, err = cli(capsys, *base[:3], "detect cat", *base[4:])
    line = one_error(code, stdout, err, 2, f"the answers in {out} were made with other settings (prompt: "
                     "'caption en')", f"delete {out} and {record} to start over")
    assert "loaded" not in err and out.read_bytes() == expected.read_bytes(), line
    for damaged, needle in [(b"", "is damaged"), (b"[1]", "is damaged"), (b'{"prompt": "caption en"}', "is damaged"),
                            (None, f"({record} is missing)")]:
        record.unlink()
        if damaged is not None:
            record.write_bytes(damaged)
        one_error(*cli(capsys, *base), 2, str(record) if damaged is not None else str(out), needle, "to start over")
        assert out.read_bytes() == expected.read_bytes() and not (tmp_path / "out.jsonl.parts").exists()
    # With no answer on disk there is nothing to mix up: once the output is deleted, a run starts over.
    out.unlink()
    code, stdout, _ = cli(capsys, *base[:3], "detect cat", *base[4:], "--max_tokens_to_generate", 1)
    assert code == 2 and "10 answered now" in stdout and json.loads(record.read_text())["prompt"] == "detect cat"


def test_a_second_run_on_the_same_output_is_refused_and_a_killed_runs_temporaries_go(ckpt, image_list, expected,
                                                                                      tmp_path, capsys):
    """While one run holds OUT.lock, another run on OUT (its settings check would pass during the first one's
    model load) is one error line and writes nothing; once it is free, a run removes a killed run's temporaries."""
    out = tmp_path / "out.jsonl"
    held = fileio.try_lock(tmp_path / "out.jsonl.lock")
    assert held is not None and held >= 0 and fileio.try_lock(tmp_path / "out.jsonl.lock") is None
    try:
        one_error(*cli(capsys, *args(ckpt, image_list, out)), 2, f"another run is writing {out}")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.lock"]
    finally:
        os.close(held)
    stale = [tmp_path / ".out.jsonl.tmp-host-123", tmp_path / ".out.jsonl.run.json.tmp-456"]
    for path in stale:
        path.write_bytes(b"x" * 100)  # what kill -9 leaves in the merge or the settings write
    cli(capsys, *args(ckpt, image_list, out))
    assert out.read_bytes() == expected.read_bytes() and not any(p.exists() for p in stale)


def test_full_disk_is_one_line_naming_the_file(ckpt, image_list, expected, tmp_path, capsys, monkeypatch):
    """ENOSPC while appending to a part file, then while writing the merged output: one error line naming the
    file (exit 2), nothing half-written; the rerun finishes the same file."""
    out = tmp_path / "out.jsonl"
    append, calls = batch_run._append, []

    def append_then_full(f, data):
        calls.append(data)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        append(f, data)

    with monkeypatch.context() as m:
        m.setattr(batch_run, "_append", append_then_full)
        one_error(*cli(capsys, *args(ckpt, image_list, out, "--batch_size", 5)), 2,
                  f"cannot write {tmp_path / 'out.jsonl.parts' / 'rank-00000.jsonl'} (No space left on device)")
    replace = os.replace

    def replace_but_output(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_but_output)
        one_error(*cli(capsys, *args(ckpt, image_list, out, "--batch_size", 5)), 2,
                  f"cannot write {out} (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.lock", "out.jsonl.parts",
                                                          "out.jsonl.run.json"]  # no temp file
    code, stdout, _ = cli(capsys, *args(ckpt, image_list, out))
    assert code == 2 and "0 answered now" in stdout and out.read_bytes() == expected.read_bytes()


def test_file_names_that_are_not_utf8_are_valid_json(ckpt, image_list, tmp_path, capsys, monkeypatch):
    """A Latin-1 file name (byte 0xE9) reaches Python as '\\udce9', which no UTF-8 writer takes: the "path" holds
    the text "\\xe9" instead, on stdout and in --output alike, and a rerun still finds the image answered."""
    monkeypatch.setattr(inference, "generate", lambda model, proc, prompts, images, *a, **k: ["a cow"] * len(prompts))
    shutil.copy(image_list.parent / "imgs" / "0.png", tmp_path / os.fsdecode(b"caf\xe9.png"))
    paths = [tmp_path / os.fsdecode(b"caf\xe9.png"), tmp_path / os.fsdecode(b"gone\xe9.png")]
    code, stdout, _ = cli(capsys, "--model_path", ckpt, "-i", *paths)
    records = [json.loads(line) for line in stdout.encode("utf-8").splitlines()]  # strict: no lone surrogate
    assert [r["path"] for r in records] == [f"{tmp_path}/caf\\xe9.png", f"{tmp_path}/gone\\xe9.png"] and code == 2
    assert records[0]["text"] == "a cow" and "gone\\xe9.png does not exist" in records[1]["error"]
    out = tmp_path / "out.jsonl"
    code, summary, err = cli(capsys, "--model_path", ckpt, "-i", *paths, "--output", out)
    assert code == 2 and out.read_bytes() == stdout.encode("utf-8"), err
    code, summary, err = cli(capsys, "--model_path", ckpt, "-i", *paths, "--output", out)
    assert "0 answered now" in summary and "loaded" not in err


def test_output_and_list_mistakes_are_one_line_errors(ckpt, image_list, tmp_path, capsys, monkeypatch):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfimgs/0.png\n")  # a UTF-8 byte-order mark, as Windows editors write
    assert batch_run.read_image_list(bom, None) == [os.path.join(tmp_path, "imgs/0.png")]
    cases = [
        (("--image_list", tmp_path / "none.txt"), "--image_list"),
        (("--image_list", image_list, "--image_file_path", "x.png"), "not both"),
        (("--image_list", image_list, "--output", tmp_path), "is a directory"),
        (("--image_list", image_list, "--output", tmp_path / "no" / "o.jsonl"), "does not exist"),
        (("--image_list", image_list, "--output", image_list.parent / "imgs" / "1.png"), "one of the input images"),
        (("--image_list", blank), "names no images"),
        # The merged output is renamed onto --output: it must not replace a device, a FIFO, a symlink or the list.
        (("--image_list", image_list, "--output", "/dev/null"), "--output /dev/null exists and is not a regular file"),
        (("--image_list", image_list, "--output", tmp_path / "fifo.jsonl"), "is not a regular file"),
        (("--image_list", image_list, "--output", tmp_path / "link.jsonl"), "is not a regular file (a symlink"),
        (("--image_list", image_list, "--output", image_list), "is the --image_list file"),
    ]
    for extra, needle in cases:
        code, out, err = cli(capsys, "--model_path", ckpt, *map(str, extra))
        assert code == 2 and out == "" and err.startswith("error: ") and needle in err, err
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # as torchrun sets them
    code, out, err = cli(capsys, "--model_path", ckpt, "--image_list", image_list)
    assert code == 2 and err == "error: under torchrun give --output FILE.jsonl: each rank answers its share into it\n"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert batch_run.Rank.from_env(env) == batch_run.Rank(launched=True) and not batch_run.Rank.from_env({}).launched
    with pytest.raises(ValueError, match="--device cuda"):
        batch_run.Rank(1, 2, 1, 2, launched=True).device("cuda:0")
