"""Segmentation masks (segmentation.py) against google-research/big_vision's own computations.

tests/data/segmentation_golden.npz holds random VAE weights in the vae-oid.npz layout and what big_vision's
`reconstruct_masks`, `encode_to_codebook_indices`, `refcoco_mask2str` and segmentation `Evaluator.run` computed
from them; tests/data/make_segmentation_golden.py wrote it (its docstring has the command).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from data.make_segmentation_golden import float_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segmentation import (
    VaeError,
    draw_segments,
    load_vae,
    mask_to_rle,
    mask_to_tokens,
    parse_segments,
)

GOLDEN = Path(__file__).parent / "data" / "segmentation_golden.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as g:
        return dict(g)


def vae_arrays(golden) -> dict[str, np.ndarray]:
    """The golden file's weights as the float32 arrays big_vision read (the golden script's own rebuild)."""
    return float_weights(golden)


@pytest.fixture(scope="module")
def vae_file(golden, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **vae_arrays(golden))
    return path


@pytest.fixture(scope="module")
def vae(vae_file):
    return load_vae(vae_file)


def unpack(bits: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.unpackbits(bits)[: height * width].reshape(height, width).astype(bool)


def test_decode_matches_big_vision_reconstruct_masks(golden, vae):
    masks = vae.decode(torch.from_numpy(golden["decode_codes"]))
    expected = golden["decode_masks"]
    assert masks.shape == expected.shape == (12, 64, 64) and masks.dtype == torch.float32
    relative = np.abs(masks.numpy() - expected).max() / np.abs(expected).max()
    assert relative <= 1e-5, relative
    assert 0.2 < (expected > 0).mean() < 0.8  # the golden masks have an inside and an outside


def test_encode_matches_big_vision_codes_exactly(golden, vae):
    codes = vae.encode(torch.from_numpy(golden["encode_masks"]))
    assert codes.dtype == torch.long
    assert np.array_equal(codes.numpy(), golden["encode_codes"])
    assert len(np.unique(golden["encode_codes"])) > 20  # many codes in play, not a degenerate encoder


def test_pasted_masks_identical_to_big_vision_evaluator(golden, vae):
    valid = golden["paste_valid"]
    assert valid.sum() >= 10 and not valid.all()  # both kinds of case are in the data
    for i, (text, (w, h)) in enumerate(zip(golden["paste_texts"], golden["paste_sizes"], strict=True)):
        segments, problems = parse_segments(str(text), int(w), int(h), vae)
        if valid[i]:
            assert problems == [] and len(segments) == 1 and segments[0].label == "thing"
            assert segments[0].mask.shape == (h, w)
            assert np.array_equal(segments[0].mask, unpack(golden[f"paste_mask_{i}"], h, w)), i
        else:
            assert segments == [] and len(problems) == 1, (i, problems)


def test_several_objects_in_one_answer_each_pasted(golden, vae):
    texts, (w, h) = golden["paste_texts"][:3], golden["paste_sizes"][0]
    answer = " ; ".join(t.replace("thing", f"thing {n}") for n, t in enumerate(texts))
    segments, problems = parse_segments(answer, int(w), int(h), vae)
    assert problems == [] and [s.label for s in segments] == ["thing 0", "thing 1", "thing 2"]
    for n, s in enumerate(segments):
        assert np.array_equal(s.mask, unpack(golden[f"paste_mask_{n}"], h, w))
        x0, y0, x1, y1 = s.box
        assert not s.mask[:y0].any() and not s.mask[y1:].any() and not s.mask[:, :x0].any() and \
            not s.mask[:, x1:].any()


def test_mask_to_tokens_matches_refcoco_mask2str(golden, vae):
    strings = golden["tokens_strings"]
    for i, expected in enumerate(strings):
        h, w = golden[f"tokens_shape_{i}"]
        mask = unpack(golden[f"tokens_mask_{i}"], h, w)
        assert mask_to_tokens(mask, vae) == str(expected), i
        ys, xs = np.nonzero(mask)  # the same box given explicitly
        assert mask_to_tokens(mask, vae, box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)) == str(expected)


def test_rle_is_what_pycocotools_decodes(golden):
    from pycocotools import mask as coco_mask

    mask = unpack(golden["paste_mask_0"], *golden["paste_sizes"][0][::-1])
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    back = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(back.astype(bool), mask) and mask.any()


@pytest.mark.parametrize("drop, needle", [
    ("decoder.6.weight", "lacks the key 'decoder.6.weight'"),
    ("_vq_vae._embedding", "lacks the key '_vq_vae._embedding'"),
    ("encoder.9.net.2.bias", "lacks the key 'encoder.9.net.2.bias'"),
])
def test_missing_key_is_named(golden, tmp_path, drop, needle):
    arrays = vae_arrays(golden)
    del arrays[drop]
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(VaeError, match=needle):
        load_vae(tmp_path / "v.npz")


@pytest.mark.parametrize("key, shape, needle", [
    ("decoder.4.weight", (128, 128, 3, 3), r"decoder.4.weight has shape \(128, 128, 3, 3\), expected \(128, 128, 4"),
    ("_vq_vae._embedding", (64, 512), r"expected \(128, 512\)"),
    ("encoder.2.weight", (8, 5, 4, 4), r"encoder.2.weight has shape \(8, 5, 4, 4\), expected \(8, 4, k, k\)"),
    ("encoder.10.bias", (16,), r"encoder.10.bias has shape \(16,\), expected \(512,\)"),
])
def test_wrong_shape_is_named(golden, tmp_path, key, shape, needle):
    arrays = vae_arrays(golden)
    arrays[key] = np.zeros(shape, np.float32)
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(VaeError, match=needle):
        load_vae(tmp_path / "v.npz")


def test_one_half_works_for_that_half(golden, tmp_path):
    arrays = vae_arrays(golden)
    np.savez(tmp_path / "dec.npz", **{k: v for k, v in arrays.items() if not k.startswith("encoder.")})
    np.savez(tmp_path / "enc.npz", **{k: v for k, v in arrays.items() if not k.startswith("decoder.")})
    dec, enc = load_vae(tmp_path / "dec.npz"), load_vae(tmp_path / "enc.npz")
    assert torch.allclose(dec.decode(golden["decode_codes"][:2]), torch.from_numpy(golden["decode_masks"][:2]),
                          rtol=0, atol=1e-5 * np.abs(golden["decode_masks"]).max())
    assert np.array_equal(enc.encode(golden["encode_masks"][:2]).numpy(), golden["encode_codes"][:2])
    with pytest.raises(VaeError, match="no encoder"):
        dec.encode(golden["encode_masks"][:1])
    with pytest.raises(VaeError, match="no decoder"):
        enc.decode(golden["decode_codes"][:1])


def test_cut_short_damaged_or_npy_vae_files_are_clear_errors(vae_file, tmp_path):
    data = vae_file.read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(VaeError, match="not a readable .npz"):
        load_vae(tmp_path / "half.npz")
    # One member's bytes flipped: the zip directory is intact, the member fails its CRC when read.
    damaged = bytearray(data)
    at = data.index(b"_vq_vae._embedding.npy") + 200
    damaged[at:at + 64] = bytes(64)
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    with pytest.raises(VaeError, match="damaged|not a readable"):
        load_vae(tmp_path / "crc.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(VaeError, match=r"single array \(.npy\)"):
        load_vae(tmp_path / "one.npy")


def test_bad_files_and_inputs_are_clear_errors(vae, tmp_path):
    with pytest.raises(VaeError, match="does not exist"):
        load_vae(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VaeError, match="not a readable .npz"):
        load_vae(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(VaeError, match="neither decoder"):
        load_vae(tmp_path / "other.npz")
    np.savez(tmp_path / "obj.npz", **{"_vq_vae._embedding": np.array([None, 1], dtype=object), "decoder.0.bias": 0})
    with pytest.raises(VaeError, match="pickle"):
        load_vae(tmp_path / "obj.npz")
    with pytest.raises(VaeError, match=r"0..127"):
        vae.decode([[128] * 16])
    with pytest.raises(VaeError, match=r"\(B, 16\)"):
        vae.decode([[1] * 15])
    with pytest.raises(VaeError, match="empty"):
        mask_to_tokens(np.zeros((5, 5), bool), vae)


def test_text_without_seg_tokens_is_not_a_segmentation_answer(vae):
    assert parse_segments("<loc0001><loc0002><loc0003><loc0004> cat", 10, 10, vae) == ([], [])
    assert parse_segments("a cat", 10, 10, vae) == ([], [])


@pytest.mark.parametrize("rest, needle", [
    ("<seg001>" * 15 + " cat", "15 <seg> tokens, expected 16"),
    ("<seg001>" * 16 + "<seg002> cat", "17 <seg> tokens"),
    ("<seg001>" * 15 + "<seg128> cat", "mask code 128 is above 127"),
    ("<seg001>" * 16 + " ", "no label"),
    ("<seg001>" * 16 + " cat ; <loc0001>", "group 2 ('<loc0001>'): 1 <loc> tokens"),
])
def test_malformed_groups_are_reported(vae, rest, needle):
    segments, problems = parse_segments(f"<loc0001><loc0002><loc0900><loc0900>{rest}", 100, 100, vae)
    assert len(segments) == ("group 2" in needle) and len(problems) == 1 and needle in problems[0], problems


FRAGMENTS = st.sampled_from(["<loc0000>", "<loc1023>", "<loc0512>", "<loc9999>", "<seg000>", "<seg127>",
                             "<seg999>", "<seg12>", " ; ", ";", " cat", " ", "\n", "<", "é"])


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=40), st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=60)
                      .map("".join)),
       width=st.integers(1, 300), height=st.integers(1, 300))
def test_any_string_parses_without_exception(vae, text, width, height):
    segments, problems = parse_segments(text, width, height, vae)
    assert all(isinstance(p, str) for p in problems)
    for s in segments:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and s.label and s.mask.shape == (height, width)


def test_drawn_masks_tint_the_mask_and_change_nothing_outside_the_boxes(golden, vae):
    text = f"{golden['paste_texts'][0].replace('thing', 'cat')} ; {golden['paste_texts'][1].replace('thing', 'dog')}"
    w, h = golden["paste_sizes"][0]
    segments, _ = parse_segments(str(text), int(w), int(h), vae)
    image = Image.new("RGB", (int(w), int(h)), (128, 128, 128))
    drawn = np.asarray(draw_segments(image, segments)).astype(int)
    changed = (drawn != 128).any(-1)
    inside = np.zeros_like(changed)
    for s in segments:
        x0, y0, x1, y1 = s.box
        inside[y0:y1, x0:x1] = True
    assert not (changed & ~inside).any()
    only_cat = segments[0].mask & ~segments[1].mask  # tinted by the cat's colour (the first label's, red)
    assert only_cat.any() and (drawn[only_cat][:, 0] > 128).mean() > 0.9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_and_encode_on_cuda_match_big_vision(golden, vae_file):
    gpu = load_vae(vae_file).to("cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 convolutions, not TF32
        masks = gpu.decode(torch.from_numpy(golden["decode_codes"]).cuda())
        codes = gpu.encode(torch.from_numpy(golden["encode_masks"]).cuda())
    assert masks.device.type == "cuda"
    expected = golden["decode_masks"]
    assert np.abs(masks.cpu().numpy() - expected).max() / np.abs(expected).max() <= 1e-5
    assert np.array_equal(codes.cpu().numpy(), golden["encode_codes"])
