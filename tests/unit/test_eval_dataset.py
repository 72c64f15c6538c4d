"""Evaluation datasets: COCO instances JSON and Rex-Omni's JSONL, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rexomni_client.evaluation.dataset import DatasetError, load_dataset
from rexomni_client.evaluation.scoring import MaskShape, MultiShape, PolygonShape


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


COCO = {
    "images": [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b.jpg"},
        {"id": 3, "file_name": "empty.jpg"},
    ],
    "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
    "annotations": [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 18,
            "bbox": [10, 20, 30, 40],
            "segmentation": [[10, 20, 40, 20, 40, 60]],
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 5, 5],
            "segmentation": [[0, 0, 5, 0, 5, 5], [1, 1, 2, 1, 2, 2]],
        },
        {
            "id": 12,
            "image_id": 2,
            "category_id": 1,
            "bbox": [0, 0, 100, 100],
            "iscrowd": 1,
            "segmentation": {"size": [100, 100], "counts": [0, 10000]},
        },
    ],
}


def test_coco_images_ask_for_their_own_categories(tmp_path: Path) -> None:
    samples = load_dataset(write(tmp_path / "instances.json", COCO), tmp_path / "imgs")
    assert [s.sample_id for s in samples] == ["1", "2"]  # the image without objects is left out
    first = samples[0]
    assert first.image == tmp_path / "imgs" / "a.jpg"
    assert first.categories == ("person", "dog")  # category id order
    dog = next(t for t in first.truths if t.category == "dog")
    assert dog.box == (10.0, 20.0, 40.0, 60.0)  # [x, y, w, h] -> [x0, y0, x1, y1]
    assert isinstance(dog.shape, PolygonShape)
    person = next(t for t in first.truths if t.category == "person")
    assert isinstance(person.shape, MultiShape)
    crowd = samples[1].truths[0]
    assert crowd.crowd and isinstance(crowd.shape, MaskShape) and crowd.shape.contains(50, 50)


def test_images_default_to_the_annotation_folder(tmp_path: Path) -> None:
    assert load_dataset(write(tmp_path / "instances.json", COCO))[0].image == tmp_path / "a.jpg"


def test_rex_omni_jsonl_boxes_masks_and_gui(tmp_path: Path) -> None:
    lines = [
        {"image_path": "coco/1.jpg", "categories": ["cat", "dog"], "gt": {"cat": [[1, 2, 3, 4]], "dog": []}},
        {
            "image_path": "p.jpg",
            "categories": ["kite"],
            "gt": {"gt_mask": {"kite": [{"size": [4, 4], "counts": [5, 6, 5]}]}},
        },
        {"image_path": "ui.png", "categories": "the search box", "gt": [10, 10, 50, 20], "id": "gui-7"},
        {"image_path": "t.jpg", "categories": ["text"], "gt": {"text": [[0, 0, 10, 0, 10, 10, 0, 10]]}},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    boxes, masks, gui, polygons = load_dataset(path, tmp_path)
    assert boxes.categories == ("cat", "dog") and boxes.boxed
    assert [t.box for t in boxes.truths] == [(1.0, 2.0, 3.0, 4.0)]
    assert not masks.boxed and masks.single_phrase and masks.truths[0].region.contains(1, 2)
    assert gui.sample_id == "gui-7" and gui.truths[0].category == "the search box"
    assert isinstance(polygons.truths[0].shape, PolygonShape) and not polygons.boxed


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "not JSON"),
        ("bad.json", json.dumps({"images": []}), "needs 'images', 'annotations' and 'categories'"),
        (
            "bad.json",
            json.dumps({**COCO, "annotations": [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}]}),
            "unknown category_id 99",
        ),
        (
            "bad.json",
            json.dumps({**COCO, "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0]}]}),
            "expected 4 numbers",
        ),
        ("bad.jsonl", json.dumps({"image_path": "x.jpg", "gt": {}}), "line 1: missing 'categories'"),
        (
            "bad.jsonl",
            json.dumps({"image_path": "x", "categories": ["a"], "gt": {"a": [[1, "b", 3, 4]]}}),
            "expected 4 numbers",
        ),
        (
            "bad.jsonl",
            json.dumps({"image_path": "x", "categories": ["a", "b"], "gt": [1, 2, 3, 4]}),
            "exactly one category",
        ),
        (
            "bad.jsonl",
            json.dumps({"image_path": "x", "categories": ["a"], "gt": {"a": [[1, 2, 3, 4, 5]]}}),
            "even number",
        ),
    ],
)
def test_bad_files_name_what_is_wrong(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_visual_prompts_are_read_per_category(tmp_path: Path) -> None:
    line = {"image_path": "a.jpg", "categories": ["apple"], "gt": {"apple": [[0, 0, 9, 9]]}}
    path = tmp_path / "vp.jsonl"
    path.write_text(json.dumps({**line, "visual_prompt": {"apple": [[1, 2, 3, 4], [5, 6, 7, 8]]}}))
    (sample,) = load_dataset(path)
    assert sample.visual_prompts == (("apple", ((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0))),)
    path.write_text(json.dumps({**line, "visual_prompt": {"apple": []}}))
    with pytest.raises(DatasetError, match="non-empty list of boxes"):
        load_dataset(path)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="No such file"):
        load_dataset(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(write(tmp_path / "x.json", COCO), fmt="voc")


def test_keypoint_ground_truth_from_jsonl_and_coco(tmp_path: Path) -> None:
    person = {"bbox": [0, 0, 50, 100], "keypoints": {"nose": [10, 20], "left_eye": None, "right eye": "unvisible"}}
    path = tmp_path / "kp.jsonl"
    path.write_text(json.dumps({"image_path": "a.jpg", "categories": ["person"], "gt": {"person": [person]}}))
    (sample,) = load_dataset(path)
    assert sample.truths[0].box == (0.0, 0.0, 50.0, 100.0)
    assert sample.truths[0].keypoints == {"nose": (10.0, 20.0), "left eye": None, "right eye": None}

    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye"]}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "keypoints": [3, 4, 2, 0, 0, 0]}
        ],
    }
    (sample,) = load_dataset(write(tmp_path / "person_keypoints.json", coco))
    assert sample.truths[0].keypoints == {"nose": (3.0, 4.0), "left eye": None}  # v = 0: not labelled
    coco["annotations"][0]["keypoints"] = [3, 4, 2]  # type: ignore[index]
    with pytest.raises(DatasetError, match="2 \\(x, y, v\\) triples"):
        load_dataset(write(tmp_path / "person_keypoints.json", coco))


def test_degenerate_coco_polygons_are_skipped_and_ids_must_be_unique(tmp_path: Path) -> None:
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[5, 5, 6, 6]]}
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "cat"}]}
    (sample,) = load_dataset(write(tmp_path / "c.json", {**coco, "annotations": [annotation]}))
    assert sample.truths[0].shape is None and sample.boxed
    line = {"id": 7, "image_path": "a.jpg", "categories": ["cat"], "gt": {"cat": []}}
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(line))
    with pytest.raises(DatasetError, match="id '7' is used by more than one image"):
        load_dataset(path)
