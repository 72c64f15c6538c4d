"""Results as a COCO document, a Label Studio import file and supervision's ``Detections``."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest

from rexomni_client.export import (
    SKELETONS,
    detection_arrays,
    keypoint_set_for,
    to_coco,
    to_labelstudio,
    to_supervision,
)
from rexomni_server.tasks import KEYPOINT_SETS
from tests.support import detect_result

# COCO's own person skeleton (person_keypoints_val2017.json), 1-based indices.
COCO_PERSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip


BOX = {"type": "box", "label": "cat", "box": [10, 20, 110, 70], "score": 0.9}
POLYGON = {"type": "polygon", "label": "sign", "polygon": [[0, 0], [40, 0], [40, 30], [0, 30]]}
POINT = {"type": "point", "label": "cup", "point": [50, 25], "score": 0.5}
PERSON = {
    "type": "keypoints",
    "label": "person",
    "box": [0, 0, 100, 100],
    "score": 0.8,
    "keypoints": {"nose": [50, 10], "left eye": None, "left shoulder": [30, 40]},
}


def test_skeletons_join_keypoints_of_their_set() -> None:
    for kind, edges in SKELETONS.items():
        assert {name for edge in edges for name in edge} == set(KEYPOINT_SETS[kind])  # every keypoint joined


def test_coco_document_has_images_categories_and_annotations() -> None:
    doc = to_coco([("a.jpg", detect_result([BOX, POLYGON, POINT])), ("dir/b.png", detect_result([BOX], 640, 480))])
    assert doc["images"] == [
        {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
        {"id": 2, "file_name": "dir/b.png", "width": 640, "height": 480},
    ]
    assert doc["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "sign"}, {"id": 3, "name": "cup"}]
    box, polygon, point, second = doc["annotations"]
    assert box == {
        "id": 1,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [10, 20, 100, 50],
        "area": 5000,
        "score": 0.9,
    }
    assert polygon["segmentation"] == [[0, 0, 40, 0, 40, 30, 0, 30]]
    assert polygon["bbox"] == [0, 0, 40, 30] and polygon["area"] == 1200
    assert "score" not in polygon  # unknown: left out, not null
    # COCO has no points: a zero-size box at the point, the point kept beside it.
    assert point["bbox"] == [50, 25, 0, 0] and point["area"] == 0 and point["point"] == [50, 25]
    assert (second["id"], second["image_id"], second["category_id"]) == (4, 2, 1)
    assert doc["info"]["model"] == "rex-omni-test"


def test_coco_keypoints_use_the_coco_layout() -> None:
    doc = to_coco([("p.jpg", detect_result([PERSON], task="keypoint"))], keypoint_type="person")
    (category,) = doc["categories"]
    assert category["keypoints"] == list(KEYPOINT_SETS["person"])
    assert category["skeleton"] == COCO_PERSON_SKELETON
    (annotation,) = doc["annotations"]
    flat = annotation["keypoints"]
    assert len(flat) == 3 * 17
    assert flat[0:3] == [50, 10, 2]  # nose, visible
    assert flat[3:6] == [0, 0, 0]  # left eye: hidden
    assert flat[15:18] == [30, 40, 2]  # left shoulder (the 6th)
    assert annotation["num_keypoints"] == 2 and annotation["bbox"] == [0, 0, 100, 100]


def test_coco_keypoints_outside_any_set_keep_their_names() -> None:
    odd = {**PERSON, "label": "robot", "keypoints": {"antenna": [1, 2], "nose": [3, 4]}}
    doc = to_coco([("r.jpg", detect_result([odd]))])
    assert doc["categories"][0]["keypoints"] == ["antenna", "nose"] and doc["categories"][0]["skeleton"] == []
    assert doc["annotations"][0]["keypoints"] == [1, 2, 2, 3, 4, 2]


def test_keypoint_set_is_what_was_asked_else_what_the_names_say() -> None:
    shared = ["nose", "left eye"]  # in both sets
    assert keypoint_set_for("dog", shared, "animal") == "animal"
    assert keypoint_set_for("person", shared) == "person"
    assert keypoint_set_for("dog", shared) is None  # ambiguous: no skeleton rather than a wrong one
    assert keypoint_set_for("dog", ["nose", "neck"]) == "animal"
    assert keypoint_set_for("x", ["nose", "left wrist"], "animal") == "person"  # not the asked set's names


def test_coco_document_loads_in_pycocotools() -> None:
    coco_module = pytest.importorskip("pycocotools.coco")
    doc = to_coco([("a.jpg", detect_result([BOX, POLYGON]))])
    coco = coco_module.COCO()
    coco.dataset = doc
    coco.createIndex()
    mask = coco.annToMask(coco.loadAnns([2])[0])
    assert mask.shape == (100, 200) and abs(int(mask.sum()) - 1200) <= 80  # the polygon, rasterised
    assert len(coco.loadRes([{**a, "score": 1.0} for a in doc["annotations"]]).getAnnIds()) == 2


def test_labelstudio_tasks_in_percent() -> None:
    tasks = to_labelstudio(
        [("http://x/a.jpg", detect_result([BOX, POLYGON, POINT, PERSON]))], from_name="tag", to_name="img"
    )
    (task,) = tasks
    assert task["data"] == {"image": "http://x/a.jpg"}
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "rex-omni-test"
    assert prediction["score"] == pytest.approx((0.9 + 0.5 + 0.8) / 3, abs=1e-4)
    regions = prediction["result"]
    assert len({r["id"] for r in regions}) == len(regions)
    assert all(r["to_name"] == "img" and (r["original_width"], r["original_height"]) == (200, 100) for r in regions)
    box = regions[0]
    assert (box["type"], box["from_name"], box["score"]) == ("rectanglelabels", "tag", 0.9)
    assert box["value"] == {"x": 5, "y": 20, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["cat"]}
    polygon = regions[1]
    assert polygon["type"] == "polygonlabels" and "score" not in polygon
    assert polygon["value"]["points"] == [[0, 0], [20, 0], [20, 30], [0, 30]]
    assert polygon["value"]["polygonlabels"] == ["sign"]
    point = regions[2]
    assert point["type"] == "keypointlabels" and point["from_name"] == "tag"
    assert (point["value"]["x"], point["value"]["y"], point["value"]["keypointlabels"]) == (25, 25, ["cup"])
    # The person: its box, then one keypoint per visible keypoint, named, from the keypoint control.
    person_box, nose, shoulder = regions[3:]
    assert person_box["value"]["rectanglelabels"] == ["person"]
    assert [r["value"]["keypointlabels"] for r in (nose, shoulder)] == [["nose"], ["left shoulder"]]
    assert nose["from_name"] == "keypoint" and (nose["value"]["x"], nose["value"]["y"]) == (25, 10)
    assert nose["parentID"] == shoulder["parentID"] == person_box["id"]  # the instance's keypoints
    assert "parentID" not in point


def test_labelstudio_regions_stay_in_the_image() -> None:
    outside = {"type": "box", "label": "cat", "box": [-10, 50, 250, 120]}
    (task,) = to_labelstudio([("a.jpg", detect_result([outside]))])
    value = task["predictions"][0]["result"][0]["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (0, 50, 100, 50)


def test_labelstudio_prediction_without_scores_has_none() -> None:
    (task,) = to_labelstudio([("a.jpg", detect_result([POLYGON]))])
    assert "score" not in task["predictions"][0] and task["predictions"][0]["result"][0]["from_name"] == "label"
    assert task["predictions"][0]["result"][0]["to_name"] == "image"


def test_detection_arrays_are_boxes_with_class_ids() -> None:
    arrays = detection_arrays(detect_result([BOX, POLYGON, POINT, BOX]), classes=["sign"])
    assert arrays.xyxy == [[10, 20, 110, 70], [0, 0, 40, 30], [50, 25, 50, 25], [10, 20, 110, 70]]
    assert arrays.classes == ["sign", "cat", "cup"]
    assert arrays.class_id == [1, 0, 2, 1]
    assert arrays.class_name == ["cat", "sign", "cup", "cat"]
    assert arrays.kind == ["box", "polygon", "point", "box"]
    assert arrays.confidence is not None and math.isnan(arrays.confidence[1])
    assert arrays.confidence[0] == 0.9
    assert detection_arrays(detect_result([POLYGON])).confidence is None  # no scores at all
    assert detection_arrays(detect_result([])).xyxy == []


def test_to_supervision_without_supervision_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install supervision"):
        to_supervision(detect_result([BOX]))


def test_to_supervision() -> None:
    pytest.importorskip("supervision")
    detections = to_supervision(detect_result([BOX, POINT]))
    assert len(detections) == 2
    assert detections.xyxy.tolist() == [[10, 20, 110, 70], [50, 25, 50, 25]]
    assert detections.class_id.tolist() == [0, 1]
    assert detections.confidence is not None and detections.confidence.tolist() == pytest.approx([0.9, 0.5])
    assert list(detections.data["class_name"]) == ["cat", "cup"]
    assert len(to_supervision(detect_result([]))) == 0


def test_to_supervision_builds_the_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy arrays handed to ``supervision.Detections``, with a stand-in for it (the real
    one runs in test_to_supervision where supervision is installed)."""
    np = pytest.importorskip("numpy")
    monkeypatch.setitem(sys.modules, "supervision", types.SimpleNamespace(Detections=lambda **kw: kw))
    given: Any = to_supervision(detect_result([BOX, POLYGON]))
    assert given["xyxy"].dtype == np.float32 and given["xyxy"].shape == (2, 4)
    assert given["class_id"].tolist() == [0, 1] and given["data"]["class_name"].tolist() == ["cat", "sign"]
    assert np.isnan(given["confidence"][1])
    empty: Any = to_supervision(detect_result([]))
    assert empty["xyxy"].shape == (0, 4) and empty["confidence"] is None and len(empty["data"]["class_name"]) == 0
