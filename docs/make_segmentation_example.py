"""Make docs/segmentation_example.png: masks drawn from a fixed segmentation answer, decoded by a VAE with
random weights. It shows the format (a translucent mask per object in its box, the box, the label) — not real
masks: those need big_vision's trained vae-oid.npz, which this repository does not ship.

    python docs/make_segmentation_example.py

The VAE is the test suite's random one (tests/data/segmentation_golden.npz, in the vae-oid.npz layout); the
answer is written by hand in PaliGemma's format for "segment ball ; box", its boxes those of
docs/make_detection_example.py's scene, its mask codes arbitrary. The CLI does the same with the model's answer
(`--vae_path vae-oid.npz --output_image`); the JSON it prints is below the picture in the README.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from data.make_segmentation_golden import float_weights  # noqa: E402

from segmentation import draw_segments, load_vae, parse_segments  # noqa: E402

HERE = Path(__file__).resolve().parent
CODES = ("<seg012><seg045><seg045><seg100><seg012><seg077><seg003><seg100><seg064><seg077><seg003><seg090>"
         "<seg064><seg021><seg021><seg090>")
ANSWER = f"<loc0341><loc0192><loc0725><loc0480>{CODES} ball ; <loc0426><loc0575><loc0959><loc0895>{CODES} box"

with np.load(ROOT / "tests" / "data" / "segmentation_golden.npz") as golden, tempfile.TemporaryDirectory() as tmp:
    np.savez(Path(tmp) / "vae-oid.npz", **float_weights(golden))
    vae = load_vae(Path(tmp) / "vae-oid.npz")

scene = Image.open(HERE / "detection_input.png")  # docs/make_detection_example.py's synthetic scene
segments, problems = parse_segments(ANSWER, *scene.size, vae)
draw_segments(scene, segments).save(HERE / "segmentation_example.png")
record = {"segments": [s.to_json() for s in segments], "problems": problems}
for s in record["segments"]:
    s["mask"]["counts"] = s["mask"]["counts"][:24] + "..."  # shortened for the README
print(json.dumps(record))
