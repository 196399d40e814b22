"""Many images (files, a directory, a glob) as JSON Lines in input order, --json, --output_image, --verbose,
--help. Most runs go through inference.cli in-process (the same path as the command line, without ~3 s of
interpreter start-up each); the folder run is a real subprocess."""

import inspect
import json
import os

import numpy as np
import pytest
from bad_input import dds_unknown_format, two_page_tiff
from conftest import assert_no_near_ties, random_image, run_cli
from conftest import cli_in_process as cli
from PIL import Image

import inference
from cli_checks import UsageError
from image_files import output_image_paths
from processing_paligemma import draw_detections, parse_detections

SIZES = [(64, 48), (30, 90), (120, 40), (50, 50)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 images, sorted by name: a, b, c (corrupt: a truncated JPEG), d, e; plus a text file that is skipped."""
    d = tmp_path_factory.mktemp("folder")
    names = ["a.png", "b.jpg", "d.png", "e.webp"]
    for i, (name, size) in enumerate(zip(names, SIZES, strict=True)):
        random_image(10 + i, size).save(d / name)
    random_image(9, (64, 64)).save(d / "c.jpg")
    (d / "c.jpg").write_bytes((d / "c.jpg").read_bytes()[:300])
    (d / "notes.txt").write_text("not an image")
    return d


def single(capsys, ckpt, image, prompt="caption en", n=12):
    code, out, err = cli(capsys, "--model_path", ckpt, "--prompt", prompt, "--image_file_path", image,
                         "--max_tokens_to_generate", n, "--stream", "False")
    assert code == 0, err
    return out.removesuffix("\n")


@pytest.fixture(scope="module")
def clear_choices(ckpt, folder):
    """The batched runs below must print what single-image runs print: greedy answers of different batch shapes,
    equal on every CPU only if no step is a near tie (conftest.assert_no_near_ties). Checked once per image."""
    from utils import load_hf_model

    model, tok = load_hf_model(ckpt, "cpu", progress=False)
    processor = inference.make_processor(model, tok)
    for name in ["a.png", "b.jpg", "d.png", "e.webp"]:
        inputs = processor(text=["caption en"], images=[inference.load_image(str(folder / name))])
        args = inputs["input_ids"], inputs["pixel_values"]
        assert_no_near_ties(model, *args, inference.generate_ids(model, *args, inputs["attention_mask"], 12)[0])


def test_folder_run_one_line_per_image_one_error(ckpt, folder, capsys, clear_choices):
    run = run_cli("--model_path", ckpt, "--prompt", "caption en", "--image_file_path", folder,
                  "--max_tokens_to_generate", "12", "--batch_size", "2")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(folder / n) for n in ["a.png", "b.jpg", "c.jpg", "d.png",
                                                                         "e.webp"]]
    assert "truncated or corrupt" in lines[2]["error"] and set(lines[2]) == {"path", "error"}
    for line in lines[:2] + lines[3:]:  # equal to single-image runs of the CLI, image by image
        assert line["text"] == single(capsys, ckpt, line["path"]) and line["text"].strip()
        assert set(line) == {"path", "text", "boxes", "problems"}
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert [e for e in run.stderr.splitlines() if e.startswith("error:")] == [
        "error: 1 of 5 images could not be read; their JSON lines on stdout say why"]
    assert "images: 100%" in run.stderr  # the progress bar, on stderr


def test_files_and_globs_keep_the_input_order(ckpt, folder, capsys, tmp_path, clear_choices):
    a, b, d = (str(folder / n) for n in ["a.png", "b.jpg", "d.png"])
    missing = str(tmp_path / "missing.jpg")
    code, out, err = cli(capsys, "--model_path", ckpt, "--prompt", "caption en", "--image_file_path", d, missing, a,
                         d, "--max_tokens_to_generate", 12, "--batch_size", 3)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == [d, missing, a, d] and code == 2
    assert lines[1] == {"path": missing, "error": f"image file {missing} does not exist; check --image_file_path"}
    assert lines[0]["text"] == lines[3]["text"] == single(capsys, ckpt, d)
    assert lines[2]["text"] == single(capsys, ckpt, a)
    # A quoted glob, matching one file: still JSON Lines (the format follows the command, not the match count).
    code, out, _ = cli(capsys, "--model_path", ckpt, "--image_file_path", str(folder / "[b]*"),
                       "--max_tokens_to_generate", 3)
    assert code == 0 and [json.loads(line)["path"] for line in out.splitlines()] == [b]


def test_boxes_are_in_each_images_own_pixels(ckpt, folder, capsys, monkeypatch, tmp_path):
    answer = "<loc0000><loc0000><loc1023><loc0511> left half ; <loc0256><loc0256><loc0767><loc0767> middle"
    monkeypatch.setattr(inference, "generate", lambda model, proc, prompts, images, *a, **k: [answer] * len(prompts))
    out_dir = tmp_path / "drawn"
    out_dir.mkdir()
    code, out, _ = cli(capsys, "--model_path", ckpt, "--prompt", "detect left half ; middle", "--image_file_path",
                       folder, "--output_image", out_dir, "--batch_size", 3)
    good = [json.loads(line) for line in out.splitlines() if "error" not in line]
    assert code == 2 and len(good) == 4
    for line, (w, h) in zip(good, SIZES, strict=True):
        assert line["boxes"][0] == {"label": "left half", "box": [0.0, 0.0, round(511 / 1023 * w, 2), float(h)],
                                    "loc": [0, 0, 1023, 511]}
        assert line["problems"] == [] and [b["label"] for b in line["boxes"]] == ["left half", "middle"]
        drawn = Image.open(out_dir / (line["path"].rsplit("/", 1)[1].rsplit(".", 1)[0] + ".png"))
        expected = draw_detections(inference.load_image(line["path"]), parse_detections(answer, w, h)[0])
        assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "d.png", "e.png"]


def test_damaged_images_raising_other_exceptions_are_error_lines(ckpt, folder, capsys, monkeypatch, tmp_path):
    """Pillow raises TypeError, NotImplementedError, ... (not OSError) on some damaged files: each is that image's
    error record like any unreadable image, and an --output run finishes (it used to stop at such an image, every
    rerun again)."""
    two_page_tiff(tmp_path / "two.tif")
    dds_unknown_format(tmp_path / "x.dds")
    monkeypatch.setattr(inference, "generate", lambda model, proc, prompts, images, *a, **k: ["a cow"] * len(prompts))
    out = tmp_path / "out.jsonl"
    code, summary, err = cli(capsys, "--model_path", ckpt, "-i", tmp_path / "two.tif", folder / "a.png",
                             tmp_path / "x.dds", "--output", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 2 and "2 unreadable" in summary and "Traceback" not in err and records[1]["text"] == "a cow"
    assert records[0]["error"].startswith(f"image file {tmp_path / 'two.tif'} is truncated or corrupt (Missing dim")
    assert "is truncated or corrupt (Unknown pixel format flags 0)" in records[2]["error"]


def test_output_image_directory_is_checked_in_linear_time(tmp_path, monkeypatch):
    """--output_image DIR for N images: one stat per target, and one per input only when some target exists (it
    was N x N samefile calls: 99 s for 4000 images); an input that is a target (a hard link) is still refused."""
    n = 200
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    paths = [str(tmp_path / "in" / f"{i}.jpg") for i in range(n)]
    for path in paths:
        open(path, "wb").close()
    stat, calls = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: calls.append(str(path)) or stat(path, *a, **k))
    assert len(output_image_paths(tmp_path / "out", paths, True)) == n
    assert not [c for c in calls if c.startswith(str(tmp_path / "in"))]  # a fresh directory: no input stat'ed
    for i in range(n):
        open(tmp_path / "out" / f"{i}.png", "wb").close()
    calls.clear()
    output_image_paths(tmp_path / "out", paths, True)
    assert len(calls) <= 2 * n + 10, len(calls)
    os.unlink(tmp_path / "out" / "7.png")
    os.link(paths[9], tmp_path / "out" / "7.png")
    with pytest.raises(UsageError, match=f"--output_image {tmp_path / 'out' / '7.png'} is the input image {paths[9]}"):
        output_image_paths(tmp_path / "out", paths, True)


def test_single_image_json_and_drawing(ckpt, capsys, monkeypatch, tmp_path):
    image = tmp_path / "img.jpg"
    random_image(4, (90, 60)).save(image)
    answer = "<loc0100><loc0200><loc0900><loc0800> cat ; <loc0001><loc0002> dog"
    monkeypatch.setattr(inference, "generate", lambda *a, **k: [answer])
    drawn = tmp_path / "boxes.png"
    code, out, err = cli(capsys, "--model_path", ckpt, "--prompt", "detect cat ; dog", "--image_file_path", image,
                         "--json", "--output_image", drawn)
    assert code == 0, err
    boxes, problems = parse_detections(answer, 90, 60)
    assert json.loads(out) == {"path": str(image), "text": answer, "boxes": [b.to_json() for b in boxes],
                               "problems": problems}
    assert out.count("\n") == 1 and len(problems) == 1 and "2 <loc> tokens" in problems[0]
    assert f"note: drew 1 box on {drawn}" in err and f"note: {problems[0]}" in err
    expected = draw_detections(inference.load_image(str(image)), boxes)
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(expected))


def test_verbose_reports_load_first_token_and_speed(ckpt, folder, capsys):
    code, out, err = cli(capsys, "--model_path", ckpt, "--image_file_path", folder / "a.png", "--verbose",
                         "--max_tokens_to_generate", 5)
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert code == 0 and out.strip()
    assert notes[0].startswith("note: load ") and notes[0].endswith(" s")
    assert notes[1].startswith("note: first token ") and "prefill" in notes[1]
    assert notes[2].startswith("note: ") and notes[2].endswith("tokens/s") and len(notes) == 3
    code, out, err = cli(capsys, "--model_path", ckpt, "--image_file_path", folder, "--verbose", "True",
                         "--max_tokens_to_generate", 3, "--batch_size", 4)
    assert "note: 4 images in 2 batches" in err and "images/s" in err


def test_help_documents_every_flag():
    run = run_cli("--help")
    shown = run.stdout + run.stderr  # fire writes help to stderr when it is not a terminal
    doc = inference.main.__doc__
    for name in inspect.signature(inference.main).parameters:
        assert f"--{name}=" in shown, name
        assert f"        {name}: " in doc, name  # described in the docstring's Args, which fire shows
    assert run.returncode == 0 and "hub id" in shown and "JSON" in shown and "directory" in shown


def test_short_flags_that_help_lists_work(ckpt, folder, capsys):
    code, out, err = cli(capsys, "--model_path", ckpt, "-p", "caption en", "-i", folder / "a.png",
                         "--max_tokens_to_generate", 12, "-j")
    assert code == 0, err
    assert json.loads(out)["text"] == single(capsys, ckpt, folder / "a.png")
