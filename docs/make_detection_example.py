"""Make docs/detection_example.png: labelled boxes drawn from a fixed detection answer (no model involved).

    python docs/make_detection_example.py

A synthetic 320x240 scene (so the repository ships no photo) and the answer a detector would give for
"detect ball ; box", written by hand in PaliGemma's format. It shows what `--output_image` draws and what
`parse_detections` returns; the CLI does the same with the model's answer.
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from processing_paligemma import draw_detections, parse_detections  # noqa: E402

HERE = Path(__file__).resolve().parent
ANSWER = "<loc0341><loc0192><loc0725><loc0480> ball ; <loc0426><loc0575><loc0959><loc0895> box ; <loc0100><loc0200>"

scene = Image.new("RGB", (320, 240), (186, 220, 240))
draw = ImageDraw.Draw(scene)
draw.rectangle([0, 170, 319, 239], fill=(120, 170, 90))  # grass
draw.ellipse([60, 80, 150, 170], fill=(220, 60, 50))  # ball: x 60..150, y 80..170
draw.rectangle([180, 100, 280, 225], fill=(70, 90, 170))  # box: x 180..280, y 100..225
scene.save(HERE / "detection_input.png")

boxes, problems = parse_detections(ANSWER, *scene.size)
draw_detections(scene, boxes).save(HERE / "detection_example.png")
print(json.dumps({"boxes": [b.to_json() for b in boxes], "problems": problems}))
