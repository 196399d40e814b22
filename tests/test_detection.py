"""Detection answers -> boxes (parse_detections) and boxes drawn on the image (draw_detections)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from processing_paligemma import Detection, draw_detections, parse_detections


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def test_one_box_follows_big_vision_bin_rule():
    # transformers' integration test answer for "detect shoe" on its cow photo (PALIGEMMA_FACTS.md).
    boxes, problems = parse_detections("<loc0051><loc0309><loc0708><loc0646> shoe", 640, 480)
    assert problems == []
    assert boxes == [Detection("shoe", (round(309 / 1023 * 640, 2), round(51 / 1023 * 480, 2),
                                        round(646 / 1023 * 640, 2), round(708 / 1023 * 480, 2)), (51, 309, 708, 646))]
    assert boxes[0].box == (193.31, 23.93, 404.14, 332.2)
    assert boxes[0].to_json() == {"label": "shoe", "box": [193.31, 23.93, 404.14, 332.2], "loc": [51, 309, 708, 646]}


def test_several_boxes_and_labels_with_spaces():
    text = (f"{loc(0, 0, 1023, 1023)} traffic light ; {loc(100, 200, 300, 400)} dog ; "
            f"{loc(10, 20, 30, 40)} hot dog stand")
    boxes, problems = parse_detections(text, 1023, 2046)
    assert problems == []
    assert [b.label for b in boxes] == ["traffic light", "dog", "hot dog stand"]
    assert boxes[1].box == (200.0, 200.0, 400.0, 600.0)  # x scales by width 1023, y by height 2046
    assert boxes[2].loc == (10, 20, 30, 40)


def test_bin_edges_map_to_the_image_edges():
    boxes, problems = parse_detections(loc(0, 0, 1023, 1023) + " all", 37, 11)
    assert problems == [] and boxes[0].box == (0.0, 0.0, 37.0, 11.0)
    boxes, _ = parse_detections(loc(0, 1022, 1, 1023) + " corner", 1023, 1023)
    assert boxes[0].box == (1022.0, 0.0, 1023.0, 1.0)  # smallest box: one bin wide


def test_segmentation_answer_gives_its_box():
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    boxes, problems = parse_detections(f"{loc(1, 2, 3, 4)}{seg} cat", 1023, 1023)
    assert problems == [] and boxes == [Detection("cat", (2.0, 1.0, 4.0, 3.0), (1, 2, 3, 4))]


@pytest.mark.parametrize("text, n_boxes, needle", [
    (loc(1, 2) + " cat", 0, "2 <loc> tokens, expected 4"),                          # cut short
    (loc(1, 2, 3, 4, 5) + " cat", 0, "5 <loc> tokens, expected 4"),
    (loc(1, 2, 3, 4) + " cat ; " + loc(5, 6), 1, "group 2 ('<loc0005><loc0006>'): 2 <loc> tokens"),  # partial last
    (loc(1, 2, 3, 4), 0, "no label after the box"),
    (loc(1, 2, 3, 4) + " ; " + loc(1, 2, 3, 4) + " dog", 1, "group 1 ('<loc0001><loc0002><loc0003><loc0004>')"),
    (loc(5, 2, 5, 4) + " flat", 0, "empty or inverted box (y 5..5, x 2..4)"),
    (loc(9, 2, 5, 4) + " upside down", 0, "empty or inverted box (y 9..5"),
    ("<loc1500><loc0002><loc0003><loc0004> big", 0, "bin 1500 is above 1023"),
    ("here: " + loc(1, 2, 3, 4) + " cat", 1, "text 'here:' before the first box is not part of any box"),
    (loc(1, 2, 3, 4) + " cat ; and more ; " + loc(1, 2, 3, 4) + " dog", 2, "text 'and more' after group 1"),
])
def test_malformed_groups_are_reported_not_raised(text, n_boxes, needle):
    boxes, problems = parse_detections(text, 100, 100)
    assert len(boxes) == n_boxes
    assert len(problems) == 1 and needle in problems[0], problems


@pytest.mark.parametrize("text", ["", "a cow on the beach", "; ;", "<lo", "\n"])
def test_text_without_loc_tokens_is_not_a_detection_answer(text):
    assert parse_detections(text, 10, 10) == ([], [])


def test_a_broken_loc_token_is_reported():
    assert parse_detections("<loc12> cat", 10, 10) == (
        [], ["text '<loc12> cat' before the first box is not part of any box"])


# Fragments that make near-miss answers far more often than random text does.
FRAGMENTS = st.sampled_from(["<loc0000>", "<loc1023>", "<loc0512>", "<loc9999>", "<loc12>", "<seg005>", " ; ", ";",
                             " cat", " ", "\n", "<", ">", "dog house", "é", "\ufffd"])


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=30).map("".join)),
       width=st.integers(1, 10000), height=st.integers(1, 10000))
def test_any_string_parses_without_exception(text, width, height):
    boxes, problems = parse_detections(text, width, height)
    assert all(isinstance(p, str) for p in problems)
    for b in boxes:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and b.label == b.label.strip() and b.label


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a.convert("RGB")) != np.asarray(b.convert("RGB"))).any(-1)


def test_drawn_boxes_change_the_box_pixels_and_nothing_else():
    image = Image.new("RGB", (120, 90), (128, 128, 128))
    before = image.copy()
    boxes, _ = parse_detections(f"{loc(100, 100, 500, 700)} cat ; {loc(600, 50, 1023, 1023)} a long label", 120, 90)
    drawn = draw_detections(image, boxes)
    assert np.array_equal(np.asarray(image), np.asarray(before))  # the input is not modified
    assert drawn.size == image.size and drawn.mode == "RGB"
    changed = _changed(image, drawn)
    inside = np.zeros_like(changed)
    for b in boxes:
        x0, y0, x1, y1 = b.box
        inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        # every pixel of the outline changed: its four edges
        lft, top, rgt, btm = int(x0), int(y0), int(np.ceil(x1)) - 1, int(np.ceil(y1)) - 1
        for edge in (changed[top, lft:rgt + 1], changed[btm, lft:rgt + 1], changed[top:btm + 1, lft],
                     changed[top:btm + 1, rgt]):
            assert edge.all()
    assert not (changed & ~inside).any()  # nowhere outside the boxes
    assert changed.sum() < inside.sum()   # an outline and a tag, not a filled box


def test_label_tag_is_cut_at_a_small_box_and_modes_other_than_rgb_work():
    image = Image.new("L", (200, 200), 90)
    boxes, _ = parse_detections(loc(500, 500, 520, 520) + " a very long label for a tiny box", 200, 200)
    changed = _changed(image, draw_detections(image, boxes))
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= 97 and xs.max() <= 102 and ys.min() >= 97 and ys.max() <= 102


def test_no_boxes_draws_nothing():
    image = Image.new("RGB", (30, 20), (1, 2, 3))
    assert not _changed(image, draw_detections(image, [])).any()
