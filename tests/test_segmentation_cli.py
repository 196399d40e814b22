"""Segmentation answers through the CLI: --vae_path (given, default beside the checkpoint, hub location), --json
segments as COCO RLE, --output_image masks drawn, several images as JSON Lines, and the note without a VAE.
The model's answer is fixed (generate is replaced): the masks' parity with big_vision is test_segmentation.py's."""

import json
import shutil

import numpy as np
import pytest
from conftest import cli_in_process as cli
from conftest import random_image
from PIL import Image
from pycocotools import mask as coco_mask
from test_segmentation import golden, vae, vae_arrays, vae_file  # noqa: F401 — fixtures

import inference
from segmentation import draw_segments, parse_segments

CODES = "".join(f"<seg{c:03d}>" for c in (5, 17, 99, 3, 127, 0, 64, 64, 12, 80, 33, 21, 7, 100, 2, 90))
ANSWER = f"<loc0100><loc0050><loc0900><loc0600>{CODES} cat ; <loc0200><loc0500><loc1000><loc1000>{CODES} dog ; " \
         "<loc0001><loc0002><loc0003><loc0004><seg001> bad"


@pytest.fixture
def answer(monkeypatch):
    monkeypatch.setattr(inference, "generate", lambda model, proc, prompts, *a, **k: [ANSWER] * len(prompts))
    return ANSWER


def test_json_and_drawing_with_vae(ckpt, capsys, answer, vae_file, vae, tmp_path):  # noqa: F811
    image = tmp_path / "img.png"
    random_image(3, (90, 60)).save(image)
    drawn = tmp_path / "drawn.png"
    code, out, err = cli(capsys, "--model_path", ckpt, "-p", "segment cat ; dog", "-i", image, "--json",
                         "--vae_path", vae_file, "--output_image", drawn)
    assert code == 0, err
    record = json.loads(out)
    segments, problems = parse_segments(answer, 90, 60, vae)
    assert len(segments) == 2 and record["problems"] == problems and "1 <seg> tokens, expected 16" in problems[0]
    assert [s["label"] for s in record["segments"]] == ["cat", "dog"]
    for got, want in zip(record["segments"], segments, strict=True):
        assert got["box"] == list(want.box) and got["mask"]["size"] == [60, 90]
        back = coco_mask.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()})
        assert np.array_equal(back.astype(bool), want.mask) and got["area"] == int(want.mask.sum()) > 0
    # "boxes" stays the detection view: every whole box, also the one whose mask codes are cut short
    assert [b["label"] for b in record["boxes"]] == ["cat", "dog", "bad"]
    expected = draw_segments(Image.open(image), segments)
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(expected))


def test_without_vae_the_answer_prints_with_a_note(ckpt, capsys, answer, tmp_path):
    image = tmp_path / "img.png"
    random_image(3, (40, 30)).save(image)
    code, out, err = cli(capsys, "--model_path", ckpt, "-p", "segment cat", "-i", image)
    assert code == 0 and out == answer + "\n"
    assert "note: the answer holds segmentation masks" in err and "--vae_path" in err
    code, out, err = cli(capsys, "--model_path", ckpt, "-p", "segment cat", "-i", image, "--json")
    assert "segments" not in json.loads(out) and "--vae_path" in err


def test_default_vae_beside_the_checkpoint_and_many_images(ckpt, capsys, answer, vae_file, vae, tmp_path):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    shutil.copy(vae_file, model / "vae-oid.npz")
    for name, size in (("a.png", (50, 40)), ("b.png", (30, 70))):
        random_image(5, size).save(tmp_path / name)
    out_dir = tmp_path / "drawn"
    out_dir.mkdir()
    code, out, err = cli(capsys, "--model_path", model, "-p", "segment cat", "-i", tmp_path / "a.png",
                         tmp_path / "b.png", "--output_image", out_dir)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    for line, (w, h) in zip(lines, ((50, 40), (30, 70)), strict=True):
        segments, _ = parse_segments(answer, w, h, vae)
        assert [s["area"] for s in line["segments"]] == [int(s.mask.sum()) for s in segments]
        assert Image.open(out_dir / line["path"].split("/")[-1]).size == (w, h)


def _junk(tmp_path, weights):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    return tmp_path / "junk.npz"


def _lacking(tmp_path, weights):
    arrays = {k: v for k, v in weights.items() if k != "decoder.12.bias"}
    np.savez(tmp_path / "part.npz", **arrays)
    return tmp_path / "part.npz"


@pytest.mark.parametrize("make, needle", [
    (lambda tmp_path, weights: tmp_path / "missing.npz", "missing.npz does not exist; download vae-oid.npz"),
    (_junk, "junk.npz is not a readable .npz file"),
    (_lacking, "part.npz lacks the key 'decoder.12.bias'"),
    (lambda tmp_path, weights: "hf://spaces/big-vision/paligemma-hf/vae-oid.npz",
     "cannot get hf://spaces/big-vision/paligemma-hf/vae-oid.npz: it is not in the Hugging Face cache"),
])
def test_bad_vae_path_is_one_error_line_before_the_model_loads(ckpt, capsys, monkeypatch, tmp_path, golden,  # noqa: F811
                                                               make, needle):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub location is tried from an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "img.png"
    random_image(3, (20, 20)).save(image)
    code, out, err = cli(capsys, "--model_path", ckpt, "-i", image, "--vae_path", make(tmp_path, vae_arrays(golden)))
    assert code == 2 and out == "" and "loaded" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
