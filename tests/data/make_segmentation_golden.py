"""Write tests/data/segmentation_golden.npz: what google-research/big_vision's own segmentation code computes on
random weights in the `vae-oid.npz` layout. tests/test_segmentation.py compares segmentation.py against it.

    python -m venv /tmp/bvenv && /tmp/bvenv/bin/pip install jax flax tensorflow-cpu numpy pillow absl-py
    git clone https://github.com/google-research/big_vision /tmp/big_vision
    /tmp/bvenv/bin/python tests/data/make_segmentation_golden.py --big_vision /tmp/big_vision

Nothing of the reference is re-implemented here: the outputs come from big_vision's functions, called as is —
`get_reconstruct_masks` (flax `Decoder`), `encode_to_codebook_indices` and the `refcoco_mask2str` pp op
(TensorFlow), and `Evaluator.run` (the evaluator's token validity rule, `int()` box and PIL paste). Their weights
path is this script's random npz, passed where big_vision takes a model name or path. Three big_vision modules
that the evaluator imports only for multi-host plumbing, data pipelines and the tokenizer
(big_vision.evaluators.common, big_vision.utils, big_vision.pp.tokenizer) are replaced by stubs with the
single-process behaviour of the two functions `run` calls (`process_sum`: identity when jax.process_count() is
1, as in big_vision; `get_local_slice_from_fsarray`: the array itself); `run` gets a recording stand-in for the
ground-truth mask, which captures the pasted mask where the evaluator intersects it with the ground truth.

Weights are small integers times a power of two per tensor (exact in float32), stored as int8 so the file stays
small; `vae_npz()` in the test rebuilds the same float32 file. The decoder has the real shapes (big_vision's
Decoder fixes them); the encoder, whose widths big_vision reads from the file, is narrow here, with kernels of
3, 4 and 5 so TensorFlow's asymmetric 'SAME' padding is exercised at stride 2 and 1.
"""

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

LOC0, SEG0 = 256000, 257024  # ids of <loc0000> and <seg000> in PaliGemma's tokenizer


def layout() -> dict[str, tuple[int, ...]]:
    shapes = {"_vq_vae._embedding": (128, 512)}

    def conv(name, shape):
        shapes[name + ".weight"], shapes[name + ".bias"] = shape, (shape[1] if name in TRANSPOSED else shape[0],)

    conv("decoder.0", (128, 512, 1, 1))
    for block in ("decoder.2.net", "decoder.3.net"):
        for i, k in ((0, 3), (2, 3), (4, 1)):
            conv(f"{block}.{i}", (128, 128, k, k))
    for name, c_in, c_out in (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32),
                              ("decoder.10", 32, 16)):
        conv(name, (c_in, c_out, 4, 4))  # ConvTranspose2d layout (in, out, kh, kw)
    conv("decoder.12", (1, 16, 1, 1))
    for name, shape in (("encoder.0", (4, 1, 3, 3)), ("encoder.2", (8, 4, 4, 4)), ("encoder.4", (8, 8, 3, 3)),
                        ("encoder.6", (16, 8, 5, 5))):
        conv(name, shape)
    for block in ("encoder.8.net", "encoder.9.net"):
        for i, k in ((0, 3), (2, 3), (4, 1)):
            conv(f"{block}.{i}", (16, 16, k, k))
    conv("encoder.10", (512, 16, 3, 3))
    return shapes


EMBED_STD = 0.05  # the codebook; at this scale the random encoder picks many different codes
TRANSPOSED = {"decoder.4", "decoder.6", "decoder.8", "decoder.10"}


def random_weights(rng) -> dict[str, np.ndarray]:
    """key -> int8 levels, and key + '@exp' -> e: the weight is levels · 2^-e (He-like scale, smaller biases)."""
    out = {}
    for key, shape in layout().items():
        if key.endswith(".bias"):
            std = 0.05
        elif key == "_vq_vae._embedding":
            std = EMBED_STD
        else:
            fan_in = (shape[0] if key[:-7] in TRANSPOSED else shape[1]) * shape[2] * shape[3]
            std = (2.0 / fan_in) ** 0.5 * (0.5 if ".net." in key else 1.0)
        exp = int(round(np.log2(8.0 / std)))
        out[key] = np.clip(np.round(rng.normal(0.0, 8.0, shape)), -127, 127).astype(np.int8)
        out[key + "@exp"] = np.array(exp, np.int8)
    return out


def float_weights(golden) -> dict[str, np.ndarray]:
    """The float32 vae-oid.npz arrays: int8 levels · 2^-exp, exact (the tests rebuild the file with this too)."""
    return {k: golden[k].astype(np.float32) * np.float32(2.0 ** -int(golden[k + "@exp"]))
            for k in layout()}


def stub_modules() -> None:
    """Stand-ins for the big_vision modules the evaluator imports for multi-host runs, data and the tokenizer."""
    common = types.ModuleType("big_vision.evaluators.common")
    common.process_sum = lambda tree: tree  # big_vision's own single-process branch
    utils = types.ModuleType("big_vision.utils")
    utils.get_local_slice_from_fsarray = np.asarray  # one process holds the whole array
    tokenizer = types.ModuleType("big_vision.pp.tokenizer")
    tokenizer.get_tokenizer = None  # unused: the Evaluator is built without __init__
    for module in (common, utils, tokenizer):
        sys.modules[module.__name__] = module


class GroundTruth:
    """Recording stand-in for one ground-truth mask of `h` × `w`: `Evaluator.run` computes `gt[:, :, 0] > 0`,
    reads `.shape` and `.sum()`, then `gtm[y1:y2, x1:x2] & mi` with its pasted mask `mi`, which is recorded."""

    def __init__(self, h, w):
        self.shape, self.pasted = (h, w), None

    def __getitem__(self, key):
        return self if len(key) == 3 else _Window(self, key)

    def __gt__(self, other):
        return self

    def sum(self):
        return 1


class _Window:
    def __init__(self, gt, key):
        self.gt, self.key = gt, key

    def __and__(self, mi):
        full = np.zeros(self.gt.shape, bool)
        full[self.key] = mi
        self.gt.pasted = full
        return np.asarray(mi)


def tokens(bins, codes) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins) + "".join(f"<seg{c:03d}>" for c in codes)


def paste_cases(rng):
    """(bins y0 x0 y1 x1, codes, width, height): valid boxes, edges, and ones the evaluator rejects."""
    cases = []
    for w, h in ((64, 48), (37, 23), (200, 7), (5, 150), (160, 120)):
        for _ in range(3):
            y = np.sort(rng.choice(1024, 2, replace=False))
            x = np.sort(rng.choice(1024, 2, replace=False))
            cases.append(((y[0], x[0], y[1], x[1]), rng.integers(0, 128, 16), w, h))
    cases += [((0, 0, 1023, 1023), rng.integers(0, 128, 16), 90, 70),      # whole image
              ((500, 500, 501, 501), rng.integers(0, 128, 16), 64, 48),    # empty after int(): rejected
              ((600, 100, 400, 900), rng.integers(0, 128, 16), 64, 48),    # inverted: rejected
              ((10, 20, 1000, 1010), np.array([0] * 8 + [127] * 8), 33, 33)]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big_vision", required=True, help="a checkout of google-research/big_vision")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "segmentation_golden.npz"))
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.big_vision))
    stub_modules()
    import tensorflow as tf
    from big_vision.evaluators.proj.paligemma.transfers import segmentation as bv_eval
    from big_vision.pp.proj.paligemma import segmentation as bv_pp

    rng = np.random.default_rng(args.seed)
    golden = random_weights(rng)
    tmp = tempfile.mkdtemp()
    vae_path = os.path.join(tmp, "vae-oid.npz")
    np.savez(vae_path, **float_weights(golden))

    # decoder: big_vision's reconstruct_masks on random codes (all of 0..127 among them)
    codes = np.concatenate([np.arange(128).reshape(8, 16), rng.integers(0, 128, (4, 16))]).astype(np.int32)
    # Centre the decoder's output on 0 (its last bias minus the median output), so masks have both signs.
    median = np.median(bv_eval.get_reconstruct_masks(vae_path)(codes))
    exp = int(golden["decoder.12.bias@exp"])
    golden["decoder.12.bias"] = np.clip(np.round(golden["decoder.12.bias"] - median * 2.0 ** exp), -127, 127
                                        ).astype(np.int8)
    vae_path = os.path.join(tmp, "vae-oid-centred.npz")
    np.savez(vae_path, **float_weights(golden))
    reconstruct = bv_eval.get_reconstruct_masks(vae_path)
    golden["decode_codes"] = codes
    golden["decode_masks"] = np.asarray(reconstruct(codes))[..., 0]

    # encoder: encode_to_codebook_indices on soft and hard 64×64 masks
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    masks = []
    for _ in range(6):
        cy, cx, ry, rx = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(4, 30), rng.uniform(4, 30)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        masks.append(np.clip(1.5 - d, 0, 1))  # a soft edge
        masks.append((d < 1).astype(np.float64))
    masks += [np.zeros((64, 64)), np.ones((64, 64)), rng.uniform(0, 1, (64, 64))]
    masks = np.stack(masks).astype(np.float32)
    checkpoint = bv_pp.get_checkpoint(vae_path)
    golden["encode_masks"] = masks
    golden["encode_codes"] = bv_pp.encode_to_codebook_indices(checkpoint, tf.constant(masks[..., None])).numpy()

    # mask -> tokens: the refcoco_mask2str pp op on full-size masks with their tight boxes
    op = bv_pp.get_refcoco_mask2str(vae_path)
    strings = []
    for w, h in ((96, 72), (40, 90), (150, 30), (17, 13)):
        cy, cx, ry, rx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.3 * h, 0.25 * w
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        full = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        ys, xs = np.nonzero(full)
        bbox = np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w], np.float32)
        data = {"objects/mask": tf.constant(np.repeat(full[..., None] * np.uint8(255), 3, axis=-1)),
                "objects/refs/sentence": tf.constant("x"), "objects/bbox": tf.constant(bbox)}
        golden[f"tokens_mask_{len(strings)}"] = np.packbits(full)
        golden[f"tokens_shape_{len(strings)}"] = np.array([h, w])
        strings.append(op(data)["suffix"].numpy().decode())
    golden["tokens_strings"] = np.array(strings)

    # paste: Evaluator.run, one example per case, with recording ground truths
    cases = paste_cases(rng)
    evaluator = object.__new__(bv_eval.Evaluator)
    evaluator.steps, evaluator.det_ious = 1, (0.5,)
    evaluator.loc0, evaluator.seg0 = np.array([LOC0]), np.array([SEG0])
    evaluator.reconstruct_masks = reconstruct
    decoded = np.array([np.r_[LOC0 + np.array(b), SEG0 + np.array(c), [1, 0]] for b, c, _, _ in cases])
    gts = np.empty(len(cases), object)
    gts[:] = [GroundTruth(h, w) for _, _, w, h in cases]
    batch = {"_mask": np.ones(len(cases), bool), "objects/mask": gts,
             "objects/bbox": np.tile(np.array([[0.0, 0.0, 1.0, 1.0]]), (len(cases), 1))}
    evaluator.get_data_iter = lambda: iter([batch])
    evaluator.decode = lambda train_state, batch: decoded
    dict(evaluator.run(None))  # runs the evaluator's loop; the pasted masks are in the ground truths now
    golden["paste_texts"] = np.array([tokens(b, c) + " thing" for b, c, _, _ in cases])
    golden["paste_sizes"] = np.array([(w, h) for _, _, w, h in cases])
    golden["paste_valid"] = np.array([gt.pasted is not None for gt in gts])
    for i, gt in enumerate(gts):
        if gt.pasted is not None:
            golden[f"paste_mask_{i}"] = np.packbits(gt.pasted)
    np.savez_compressed(args.out, **golden)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.2f} MB; decoder output range "
          f"{golden['decode_masks'].min():.3f}..{golden['decode_masks'].max():.3f}, "
          f"{golden['paste_valid'].sum()} of {len(cases)} pasted, strings {strings[:2]}")


if __name__ == "__main__":
    main()
