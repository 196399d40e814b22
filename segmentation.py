"""Segmentation answers -> masks, and masks -> tokens: PaliGemma's mask VQ-VAE (big_vision's `vae-oid.npz`) in
PyTorch, the parser that places each answer's masks in the image, and what the CLI prints and draws from them.

`segment cat` answers `<locY0><locX0><locY1><locX1><seg…>×16 cat` per object (" ; " between objects). The 16
codes index a 128 × 512 codebook; the decoder turns the 4 × 4 grid of code vectors into a 64 × 64 float mask,
which is resized into the box and thresholded at 0. The encoder goes the other way, for fine-tuning data.

Checked against google-research/big_vision: `big_vision/evaluators/proj/paligemma/transfers/segmentation.py`
(`Decoder`, `ResBlock`, `get_reconstruct_masks`, and `Evaluator.run`'s validity rule and paste) and
`big_vision/pp/proj/paligemma/segmentation.py` (`encode_to_codebook_indices`, `refcoco_mask2str`), through golden
files that `tests/data/make_segmentation_golden.py` writes by calling those functions (tests/test_segmentation.py).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from processing_paligemma import (
    _COLORS,
    _LOC,
    _LOC_RUN,
    _SEG_RUN,
    Detection,
    _report_stray,
    _short,
    draw_detections,
    to_rgb,
)

NUM_CODES = 128  # <seg000> .. <seg127>
CODES_PER_MASK = 16  # a 4 × 4 grid
MASK_SIZE = 64
EMBED_DIM = 512
LOC_MAX = 1023  # <loc1023>: big_vision bins boxes as round(v · 1023) and reads them back as bin / 1023
VAE_FILE = "vae-oid.npz"
_SEG = re.compile(r"<seg(\d{3})>")


class VaeError(ValueError):
    """A mask VAE file that cannot be used, or bad input to MaskVAE / mask_to_tokens."""


# ---------------------------------------------------------------------------------------------------------------
# the VAE file: PyTorch-named keys, PyTorch layouts (Conv2d (out, in, kh, kw); ConvTranspose2d (in, out, kh, kw))
# ---------------------------------------------------------------------------------------------------------------

def _decoder_shapes() -> dict[str, tuple[int, ...]]:
    """Every key decoding reads, with its shape: big_vision's `Decoder` fixes all widths (128, halving per
    transposed conv), so these are the real file's shapes."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, shape: tuple[int, ...], out: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, (out,)

    conv("decoder.0", (128, EMBED_DIM, 1, 1), 128)
    for block in ("decoder.2.net", "decoder.3.net"):
        for i, k in ((0, 3), (2, 3), (4, 1)):
            conv(f"{block}.{i}", (128, 128, k, k), 128)
    for name, (c_in, c_out) in zip(("decoder.4", "decoder.6", "decoder.8", "decoder.10"),
                                   ((128, 128), (128, 64), (64, 32), (32, 16)), strict=True):
        conv(name, (c_in, c_out, 4, 4), c_out)
    conv("decoder.12", (1, 16, 1, 1), 1)
    return shapes


_ENCODER_CONVS = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")  # stride 2 each: 64 -> 32 -> 16 -> 8 -> 4
_ENCODER_BLOCKS = ("encoder.8.net", "encoder.9.net")
_ENCODER_OUT = "encoder.10"
_ENCODER_LAYERS = (*_ENCODER_CONVS, *(f"{b}.{i}" for b in _ENCODER_BLOCKS for i in (0, 2, 4)), _ENCODER_OUT)


def _check_encoder(arrays: dict[str, np.ndarray], path: str) -> None:
    """The encoder's widths and kernel sizes are read from the file (big_vision's TensorFlow encoder does the
    same), so only their consistency is checked: square kernels, one input channel, each layer's input = the
    previous output, residual blocks keeping their width, EMBED_DIM channels out, a bias per output channel."""
    channels = 1
    for name in _ENCODER_LAYERS:
        w, b = arrays[f"{name}.weight"], arrays[f"{name}.bias"]
        out = EMBED_DIM if name == _ENCODER_OUT else (channels if ".net." in name else w.shape[0])
        if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[:2] != (out, channels):
            raise VaeError(f"{path}: {name}.weight has shape {tuple(w.shape)}, expected ({out}, {channels}, k, k) "
                           "(PyTorch Conv2d layout); is this big_vision's vae-oid.npz?")
        if b.shape != (out,):
            raise VaeError(f"{path}: {name}.bias has shape {tuple(b.shape)}, expected ({out},)")
        channels = out


def load_vae(path: str | os.PathLike) -> MaskVAE:
    """Read big_vision's `vae-oid.npz` (or a file in its layout) -> MaskVAE on the CPU, float32.

    Data only (`allow_pickle=False`). A file with any `decoder.*` key must hold every decoder key with big_vision's
    shapes; one with any `encoder.*` key, every encoder key, consistently shaped; both need `_vq_vae._embedding`
    (128 × 512). A file with one half works for that half. Raises VaeError naming the file and the key.
    """
    path = os.fspath(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise VaeError(f"mask VAE file {path} does not exist; download {VAE_FILE} (see README, Segmentation)") \
            from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip, cut short, a directory, unreadable
        raise VaeError(f"{path} is not a readable .npz file ({e}); give big_vision's {VAE_FILE}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy file: np.load returns its one array
        raise VaeError(f"{path} is a single array (.npy), not an .npz archive; give big_vision's {VAE_FILE}")
    with npz:
        keys = set(npz.files)
        halves = {"decoder": list(_decoder_shapes()),
                  "encoder": [f"{n}.{p}" for n in _ENCODER_LAYERS for p in ("weight", "bias")]}
        wanted = ["_vq_vae._embedding"] + [k for h, ks in halves.items() if any(n.startswith(h + ".") for n in keys)
                                           for k in ks]
        if len(wanted) == 1:
            raise VaeError(f"{path} has neither decoder.* nor encoder.* keys; give big_vision's {VAE_FILE}")
        arrays = {}
        for key in wanted:
            if key not in keys:
                raise VaeError(f"{path} lacks the key {key!r}; give big_vision's complete {VAE_FILE}")
            try:
                arrays[key] = npz[key]
            except ValueError as e:  # an object array, which would need pickle
                raise VaeError(f"{path}: {key} cannot be read without pickle ({e}); the file holds only arrays") \
                    from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:  # a member cut short or damaged (bad CRC)
                raise VaeError(f"{path}: {key} cannot be read ({e}); the file is damaged — download {VAE_FILE} "
                               "again") from None
            if arrays[key].dtype.kind != "f":
                raise VaeError(f"{path}: {key} has dtype {arrays[key].dtype}, expected floating point")
    expected = {"_vq_vae._embedding": (NUM_CODES, EMBED_DIM), **_decoder_shapes()}
    for key, shape in expected.items():
        if key in arrays and arrays[key].shape != shape:
            raise VaeError(f"{path}: {key} has shape {tuple(arrays[key].shape)}, expected {shape}")
    if "encoder.0.weight" in arrays:
        _check_encoder(arrays, path)
    return MaskVAE({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output ceil(size / stride), the total padding split with the extra pixel at the end
    (PyTorch's symmetric padding differs whenever the total is odd, e.g. a 3 × 3 kernel at stride 2)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaskVAE:
    """PaliGemma's mask VQ-VAE: `decode` (B, 16) codes -> (B, 64, 64) float masks, `encode` the way back.

    Holds float32 weights; `to(device)` moves them. Both directions work on batches and on any device.
    """

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    @property
    def device(self) -> torch.device:
        return self.weights["_vq_vae._embedding"].device

    def to(self, device: str | torch.device) -> MaskVAE:
        """This VAE with its weights on `device` (returns self, like nn.Module.to)."""
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        return self

    def _need(self, half: str) -> None:
        if f"{half}.0.weight" not in self.weights:
            raise VaeError(f"this mask VAE file has no {half}.* weights; give big_vision's complete {VAE_FILE}")

    def _conv(self, x: torch.Tensor, name: str, stride: int = 1, same: bool = False) -> torch.Tensor:
        """A Conv2d by its key; same=True pads as TensorFlow's 'SAME' (the encoder), else k // 2 on every side
        (the decoder: flax's padding=1 for its 3×3 and 0 for its 1×1 kernels)."""
        w = self.weights[f"{name}.weight"]
        if same:
            top, bottom = _same_padding(x.shape[-2], w.shape[-2], stride)
            left, right = _same_padding(x.shape[-1], w.shape[-1], stride)
            return F.conv2d(F.pad(x, (left, right, top, bottom)), w, self.weights[f"{name}.bias"], stride=stride)
        return F.conv2d(x, w, self.weights[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)

    def _res_block(self, x: torch.Tensor, name: str, same: bool) -> torch.Tensor:
        # Both big_vision halves: 3×3, ReLU, 3×3, ReLU, 1×1, plus the input (no ReLU after the sum).
        h = F.relu(self._conv(x, f"{name}.0", same=same))
        h = F.relu(self._conv(h, f"{name}.2", same=same))
        return x + self._conv(h, f"{name}.4", same=same)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray | Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, 16) integer codes in 0..127 -> (B, 64, 64) float32 masks on this VAE's device, as big_vision's
        `reconstruct_masks` computes them: unbounded floats (about -1..1), positive inside; no threshold."""
        self._need("decoder")
        codes = torch.as_tensor(codes, device=self.device)
        if codes.ndim != 2 or codes.shape[1] != CODES_PER_MASK or codes.is_floating_point() or codes.is_complex():
            raise VaeError(f"codes must be integers shaped (B, {CODES_PER_MASK}), got {codes.dtype} "
                           f"{tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= NUM_CODES):
            raise VaeError(f"codes must be in 0..{NUM_CODES - 1}, got {codes.min().item()}..{codes.max().item()}")
        # Code i of 16 is grid cell (i // 4, i % 4), as big_vision reshapes (B·16, D) -> (B, 4, 4, D).
        x = self.weights["_vq_vae._embedding"][codes.long()].reshape(len(codes), 4, 4, EMBED_DIM)
        x = F.relu(self._conv(x.permute(0, 3, 1, 2), "decoder.0"))
        x = self._res_block(self._res_block(x, "decoder.2.net", False), "decoder.3.net", False)
        for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
            # PyTorch's ConvTranspose2d(4, stride 2, padding 1) = flax's ConvTranspose(padding=2,
            # transpose_kernel=True) in big_vision: both double the size, e.g. 4 -> 8.
            x = F.relu(F.conv_transpose2d(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"],
                                          stride=2, padding=1))
        return self._conv(x, "decoder.12")[:, 0]

    @torch.inference_mode()
    def encode(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 64, 64) masks in [0, 1] -> (B, 16) long codes, as big_vision's `encode_to_codebook_indices`."""
        self._need("encoder")
        x = torch.as_tensor(masks, device=self.device)
        if x.ndim != 3 or tuple(x.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise VaeError(f"masks must be shaped (B, {MASK_SIZE}, {MASK_SIZE}), got {tuple(x.shape)}")
        x = 2.0 * (x.float()[:, None] - 0.5)  # [0, 1] -> [-1, 1]
        for name in _ENCODER_CONVS:
            x = F.relu(self._conv(x, name, stride=2, same=True))
        for name in _ENCODER_BLOCKS:
            x = self._res_block(x, name, True)
        x = self._conv(x, _ENCODER_OUT, same=True)
        flat = x.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)  # NHWC order, as TensorFlow flattens it
        emb = self.weights["_vq_vae._embedding"]
        # The squared distance written out as big_vision does (not cdist), so near-ties resolve alike.
        distances = (flat ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * flat @ emb.T
        return distances.argmin(1).reshape(len(x), CODES_PER_MASK)


# ---------------------------------------------------------------------------------------------------------------
# answers -> masks in the image, as big_vision's evaluator places them
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Segment:
    """One object of a segmentation answer.

    box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive: the mask's pixels lie in [y0:y1, x0:x1].
    loc: the four bins as generated (y0, x0, y1, x1); codes: the 16 mask codes; mask: (height, width) bool.
    """

    label: str
    box: tuple[int, int, int, int]
    loc: tuple[int, int, int, int]
    codes: tuple[int, ...]
    mask: np.ndarray = field(repr=False)

    def to_json(self) -> dict:
        """label, box, the mask as COCO run-length encoding (pycocotools' format) and its area in pixels."""
        return {"label": self.label, "box": list(self.box), "mask": mask_to_rle(self.mask),
                "area": int(self.mask.sum())}


def mask_to_rle(mask: np.ndarray) -> dict:
    """A (h, w) bool mask -> {"size": [h, w], "counts": str}, COCO's compressed RLE as pycocotools writes it."""
    from pycocotools import mask as coco_mask  # the format's owner; imported only when a mask is written

    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def parse_segments(text: str, width: int, height: int, vae: MaskVAE) -> tuple[list[Segment], list[str]]:
    """A segmentation answer -> (segments with full-size masks, problems); never raises on any string.

    Groups are `<loc>×4 <seg>×16 label`, " ; " between them. Each valid group is placed as big_vision's
    evaluator does: box = bins / 1023 · size, `int()` to pixels; the 64 × 64 float mask resized to the box with
    PIL bilinear; mask = value > 0. A group big_vision would count as invalid (not 4 bins in 0..1023 and 16
    codes in 0..127, or an empty box, also one that `int()` makes empty), one without a label and text outside
    the groups are described in `problems`. Text without `<seg` is not a segmentation answer: ([], []).
    """
    if not isinstance(text, str) or "<seg" not in text:
        return [], []
    problems: list[str] = []
    groups: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    parts = _LOC_RUN.split(text)  # [before, locs1, after1, locs2, after2, ...]
    _report_stray(parts[0], "before the first object", problems)
    for n, (locs, after) in enumerate(zip(parts[1::2], parts[2::2], strict=True), start=1):
        head, _, rest = after.partition(";")
        segs = _SEG_RUN.match(head.lstrip())
        seg_text = segs.group(0) if segs else ""
        label = head.lstrip()[len(seg_text):].strip()
        group = f"group {n} ({_short((locs + head).strip())})"
        _report_stray(rest, f"after {group}", problems)
        bins = tuple(int(b) for b in _LOC.findall(locs))
        codes = tuple(int(c) for c in _SEG.findall(seg_text))
        problem, box = _check_group(bins, codes, label, width, height)
        if problem:
            problems.append(f"{group}: {problem}")
        else:
            groups.append((label, box, bins, codes))
    if not groups:
        return [], problems
    masks64 = vae.decode(torch.tensor([g[3] for g in groups])).float().cpu().numpy()
    segments = [Segment(label, box, loc, codes, _paste(m64, box, width, height))
                for (label, box, loc, codes), m64 in zip(groups, masks64, strict=True)]
    return segments, problems


def _check_group(bins: tuple[int, ...], codes: tuple[int, ...], label: str, width: int, height: int) \
        -> tuple[str | None, tuple[int, ...]]:
    """(what is wrong, None) or (None, pixel box (x0, y0, x1, y1)) for one group, by the evaluator's rules."""
    if len(bins) != 4:
        return f"{len(bins)} <loc> tokens, expected 4 (y_min, x_min, y_max, x_max)", ()
    if max(bins) > LOC_MAX:
        return f"bin {max(bins)} is above {LOC_MAX}", ()
    if len(codes) != CODES_PER_MASK:
        return f"{len(codes)} <seg> tokens, expected {CODES_PER_MASK}", ()
    if max(codes) >= NUM_CODES:
        return f"mask code {max(codes)} is above {NUM_CODES - 1}", ()
    y0, x0, y1, x1 = bins
    if y1 <= y0 or x1 <= x0:
        return f"empty or inverted box (y {y0}..{y1}, x {x0}..{x1})", ()
    if not label:
        return "no label after the mask", ()
    # The evaluator's arithmetic exactly: bin / 1023 (float64), times the size, truncated by int().
    py0, px0, py1, px1 = (int(b / LOC_MAX * size) for b, size in ((y0, height), (x0, width), (y1, height),
                                                                    (x1, width)))
    if py1 <= py0 or px1 <= px0:
        return f"the box is less than a pixel wide or high in a {width}x{height} image", ()
    return None, (px0, py0, px1, py1)


def _paste(mask64: np.ndarray, box: tuple[int, ...], width: int, height: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    inside = np.asarray(Image.fromarray(mask64).resize((x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR))
    full = np.zeros((height, width), dtype=bool)
    full[y0:y1, x0:x1] = inside > 0.0  # the decoder's output is positive inside the object
    return full


# ---------------------------------------------------------------------------------------------------------------
# masks -> tokens (fine-tuning data), as big_vision's refcoco_mask2str
# ---------------------------------------------------------------------------------------------------------------

def mask_to_tokens(mask: np.ndarray, vae: MaskVAE, box: Sequence[float] | None = None) -> str:
    """A full-size binary mask (h, w) -> the `<loc>×4<seg>×16` string big_vision's `refcoco_mask2str` makes.

    box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive; default: the tightest box around the mask's pixels. As
    big_vision: box / size in float32; the crop rows/columns round(size · box); the crop (as 0/255) resized to
    64 × 64 by antialiased bilinear, / 255, encoded; the bins round(box · 1023) clipped to 0..1023.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise VaeError(f"the mask must be a non-empty 2-D (height, width) array, got shape {mask.shape}")
    h, w = mask.shape
    if box is None:
        ys, xs = np.nonzero(mask)
        if not len(ys):
            raise VaeError("the mask is empty (no pixel set); give a box, or a mask with the object in it")
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    x0, y0, x1, y1 = (float(v) for v in box)
    bbox = np.array([y0 / h, x0 / w, y1 / h, x1 / w], dtype=np.float32)  # big_vision's objects/bbox
    sizes = np.array([h, w, h, w], dtype=np.float32)
    cy0, cx0, cy1, cx1 = np.round(sizes * bbox).astype(np.int64)  # np.round halves to even, like tf.round
    crop = (mask[max(cy0, 0):cy1, max(cx0, 0):cx1] > 0).astype(np.float32) * 255.0
    if crop.size == 0:
        raise VaeError(f"the box {tuple(box)} holds no pixel of the {w}x{h} mask")
    resized = F.interpolate(torch.from_numpy(crop)[None, None], size=(MASK_SIZE, MASK_SIZE), mode="bilinear",
                            align_corners=False, antialias=True)[:, 0] / 255.0
    codes = vae.encode(resized.to(vae.device))[0].tolist()
    bins = np.clip(np.round(bbox * np.float32(LOC_MAX)), 0, LOC_MAX).astype(np.int64)
    return "".join(f"<loc{b:04d}>" for b in bins) + "".join(f"<seg{c:03d}>" for c in codes)


# ---------------------------------------------------------------------------------------------------------------
# the command line: --vae_path, the JSON fields and the drawing of a segmentation answer
# ---------------------------------------------------------------------------------------------------------------

# Where the file is published on the Hugging Face hub (a Space of the big_vision team, beside its demo);
# big_vision itself reads gs://big_vision/paligemma/vae-oid.npz.
HUB_VAE = "hf://spaces/big-vision/paligemma-hf/vae-oid.npz"
_HUB_PATH = re.compile(r"hf://(?:(spaces|datasets|models)/)?([\w.-]+/[\w.-]+)/(.+)", re.ASCII)


def resolve_vae_path(vae_path: str | None, model_path: str | os.PathLike) -> str | None:
    """--vae_path -> a local file, or None (no masks). Given: a file as it is; `hf://[spaces/]owner/name/file`
    downloaded through the Hugging Face cache (HF_HUB_OFFLINE=1: the cache only). Not given: `vae-oid.npz` in
    the checkpoint directory when it holds one. Raises VaeError with one line when the hub cannot provide it."""
    if vae_path is None:
        default = os.path.join(os.fspath(model_path), VAE_FILE)
        return default if os.path.isfile(default) else None
    hub = _HUB_PATH.fullmatch(vae_path)
    if hub is None:
        return vae_path
    from huggingface_hub import constants, hf_hub_download  # only for a hub location: a slow import
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    kind, repo, filename = hub.groups()
    advice = f"download {VAE_FILE} with network access and give its path to --vae_path"
    try:
        return hf_hub_download(repo, filename, repo_type=(kind or "models")[:-1])
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
        raise VaeError(f"cannot get {vae_path}: it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                       f"the hub cannot be reached or HF_HUB_OFFLINE=1 forbids it; {advice}") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:  # no such repository or file, or a refused download
        detail = " ".join(str(e).split())[:160]
        raise VaeError(f"cannot get {vae_path} from the Hugging Face hub ({detail}); {advice}") from None


def read_segments(text: str, size: tuple[int, int], vae: MaskVAE | None, log=None
                  ) -> tuple[list[Segment] | None, list[str]]:
    """When an answer has masks: (segments, problems) in an image of size (width, height) for a segmentation
    answer when there is a VAE; else (None, []) — and, for a segmentation answer without a VAE, a note through
    `log` (if given: the CLI's, which names its flag) that masks need --vae_path."""
    if "<seg" not in text:
        return None, []
    if vae is None:
        if log is not None:
            log("note: the answer holds segmentation masks (<seg> tokens); give --vae_path vae-oid.npz to decode "
                "them (README, Segmentation)")
        return None, []
    return parse_segments(text, *size, vae)


def draw_segments(image: Image.Image, segments: Sequence[Segment], opacity: float = 0.45) -> Image.Image:
    """A copy of `image` (as RGB) with each mask filled in its label's translucent colour, then the boxes and
    labels as draw_detections draws them (the same colour per label, in order of first appearance)."""
    out = np.asarray(to_rgb(image), dtype=np.float32).copy()
    colors: dict[str, tuple[int, int, int]] = {}
    for s in segments:
        color = np.array(colors.setdefault(s.label, _COLORS[len(colors) % len(_COLORS)]), np.float32)
        out[s.mask] = (1 - opacity) * out[s.mask] + opacity * color
    boxes = [Detection(s.label, tuple(float(v) for v in s.box), s.loc) for s in segments]
    return draw_detections(Image.fromarray(np.round(out).astype(np.uint8)), boxes)
