"""``rexomni detect --annotate``'s picture, checked on its pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from rexomni_client.draw import (
    MAX_LABEL_CHARS,
    PALETTE,
    annotate,
    label_colours,
    label_text,
    render,
    style_for,
)
from tests.support import detect_result

WHITE = (255, 255, 255)


def drawn(detections: list[dict[str, Any]], size: tuple[int, int] = (400, 400)) -> Image.Image:
    return render(Image.new("RGB", size, WHITE), detect_result(detections, *size))


def box(label: str, *xyxy: float, score: float | None = 0.93) -> dict[str, Any]:
    return {"type": "box", "label": label, "box": list(xyxy), "score": score}


def label_height(image: Image.Image, x: int, top: int, colour: tuple[int, int, int]) -> int:
    """Rows of ``colour`` straight above ``top`` at column ``x`` (the label's background)."""
    rows = 0
    while top - rows - 1 >= 0 and image.getpixel((x, top - rows - 1)) == colour:
        rows += 1
    return rows


def test_a_box_is_outlined_in_its_labels_colour_under_a_filled_label() -> None:
    image = drawn([box("cat", 100, 100, 300, 300)])
    colour = label_colours(["cat"])["cat"]
    for edge in [(100, 200), (200, 100), (300, 200), (200, 300)]:
        assert image.getpixel(edge) == colour
    assert image.getpixel((200, 200)) == WHITE  # outlined, not filled
    # The label sits on a filled box just above the top-left corner...
    assert image.getpixel((101, 98)) == colour and label_height(image, 101, 100, colour) >= 12
    # ...and has text on it, in a colour of its own.
    top = 100 - label_height(image, 101, 100, colour)
    label = image.crop((100, top, 160, 100))
    assert any(pixel not in (colour, WHITE) for _, pixel in label.getcolors(maxcolors=label.width * label.height))


def test_the_label_says_the_score() -> None:
    assert label_text("person", 0.934) == "person 0.93"
    assert label_text("person", None) == "person"
    long = label_text("x" * 100, None)
    assert len(long) == MAX_LABEL_CHARS and long.endswith("…")
    wide, narrow = drawn([box("cat", 100, 100, 300, 300)]), drawn([box("cat", 100, 100, 300, 300, score=None)])
    colour = label_colours(["cat"])["cat"]

    def label_width(image: Image.Image) -> int:
        x = 100
        while image.getpixel((x, 98)) == colour:
            x += 1
        return x - 100

    assert label_width(wide) > label_width(narrow) > 10


def test_a_larger_image_gets_a_larger_label() -> None:
    colour = label_colours(["cat"])["cat"]
    small = drawn([box("cat", 50, 50, 150, 150)], (200, 200))
    large = drawn([box("cat", 400, 400, 1200, 1200)], (1600, 1600))
    assert style_for((200, 200)).font_size == 12 and style_for((1600, 1600)).font_size == 40
    small_height, large_height = label_height(small, 51, 50, colour), label_height(large, 401, 400, colour)
    assert large_height > 2 * small_height > 0
    # The outline grows with it.
    assert large.getpixel((400 + style_for((1600, 1600)).line - 1, 800)) == colour
    assert small.getpixel((50 + style_for((200, 200)).line, 100)) == WHITE


def test_a_label_with_no_room_above_goes_inside_and_stays_in_the_image() -> None:
    colour = label_colours(["cat"])["cat"]
    image = drawn([box("cat", 0, 0, 100, 100)])
    assert image.getpixel((3, 3)) == colour  # inside the box's top-left corner
    right = drawn([box("cat", 390, 200, 399, 250)])
    assert right.getpixel((399, 198)) == colour  # moved left to fit, not cut off
    assert right.getpixel((360, 198)) == colour


def test_labels_have_distinct_stable_colours() -> None:
    labels = [f"label {i}" for i in range(len(PALETTE))]
    colours = label_colours(labels)
    assert len(set(colours.values())) == len(PALETTE)  # all different while the palette lasts
    assert colours == label_colours(reversed(labels))  # whatever the order of the detections
    assert label_colours(["cat", "dog"]) == label_colours(["dog", "cat", "dog"])
    image = drawn([box("cat", 20, 100, 100, 200), box("dog", 200, 100, 300, 200)])
    pair = label_colours(["cat", "dog"])
    assert image.getpixel((20, 150)) == pair["cat"] and image.getpixel((200, 150)) == pair["dog"]
    assert pair["cat"] != pair["dog"]


def test_keypoints_are_joined_by_their_skeleton() -> None:
    person = {
        "type": "keypoints",
        "label": "person",
        "box": [50, 50, 350, 350],
        "score": 0.8,
        "keypoints": {"nose": [200, 80], "left shoulder": [100, 100], "left elbow": [100, 200], "left wrist": None},
    }
    image = drawn([person])
    colour = label_colours(["person"])["person"]
    assert image.getpixel((100, 150)) == colour  # the shoulder-elbow line's midpoint
    assert image.getpixel((100, 200)) == colour  # the elbow's dot
    assert image.getpixel((150, 140)) == WHITE  # nose and elbow are not joined
    assert image.getpixel((100, 260)) == WHITE  # nor the elbow to the hidden wrist


def test_polygons_are_outlined_over_a_translucent_fill() -> None:
    sign = {"type": "polygon", "label": "sign", "polygon": [[100, 100], [300, 100], [300, 300], [100, 300]]}
    image = drawn([sign])
    colour = label_colours(["sign"])["sign"]
    assert image.getpixel((100, 200)) == colour
    inside = image.getpixel((200, 200))
    assert isinstance(inside, tuple) and inside not in (colour, WHITE)
    assert all(min(w, c) <= v <= max(w, c) for v, w, c in zip(inside, WHITE, colour, strict=True))  # a blend


def test_points_are_circled() -> None:
    image = drawn([{"type": "point", "label": "cup", "point": [200, 200], "score": 0.5}])
    colour = label_colours(["cup"])["cup"]
    r = style_for((400, 400)).radius
    assert image.getpixel((200, 200)) == colour  # the centre
    assert image.getpixel((200 - 2 * r, 200)) == colour  # the ring
    assert image.getpixel((200 - r, 200)) == WHITE  # between them


def test_annotate_writes_the_picture(tmp_path: Path) -> None:
    source, out = tmp_path / "in.png", tmp_path / "out.jpg"
    Image.new("L", (120, 80), 255).save(source)  # greyscale in, RGB out
    annotate(source, detect_result([box("cat", 10, 30, 60, 70)], 120, 80), out)
    written = Image.open(out)
    assert written.size == (120, 80) and written.mode == "RGB"
