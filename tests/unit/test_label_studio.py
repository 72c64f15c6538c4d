"""The Label Studio ML backend's pure logic: label configs (as Label Studio's templates write
them) read into Rex-Omni requests, results written as Label Studio regions, image references
resolved, tokens told apart, and Label Studio's request bodies read."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rexomni_server.errors import InvalidImage, InvalidRequest
from rexomni_server.label_studio import (
    KEYPOINT_WIDTH_PERCENT,
    ImageLocation,
    LabelStudioTask,
    PredictRequest,
    SetupRequest,
    failed_prediction,
    is_personal_access_token,
    jwt_expiry,
    locate_image,
    parse_label_config,
    project_id,
    to_prediction,
)
from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    DetectResult,
    ImageInfo,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
    Timings,
    Usage,
)
from rexomni_server.tasks import KEYPOINT_SETS, Task
from tests.support import LABEL_STUDIO_DETECTION_CONFIG

# ---- label configs as Label Studio's templates write them ----------------------------------------
OBJECT_DETECTION = LABEL_STUDIO_DETECTION_CONFIG

KEYPOINTS_TEMPLATE = """
<View>
  <KeyPointLabels name="kp-1" toName="img-1">
    <Label value="Face" background="red"/>
    <Label value="Nose" background="green"/>
  </KeyPointLabels>
  <Image name="img-1" value="$img"/>
</View>
"""

COCO_NAMES = [name.replace(" ", "_") for name in KEYPOINT_SETS["person"]]
HUMAN_POSE = f"""
<View>
  <Header value="Pose"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <RectangleLabels name="bbox" toName="image" model_score_threshold="0.25">
    <Label value="Person" background="#00ff00"/>
    <Label value="Bicycle" background="#0000ff"/>
  </RectangleLabels>
  <KeyPointLabels name="keypoints" toName="image" strokeWidth="2">
    {"".join(f'<Label value="{name}" smart="true" background="#ff0000"/>' for name in COCO_NAMES)}
  </KeyPointLabels>
</View>
"""

OCR_POLYGONS = """
<View>
  <Image name="image" value="$ocr"/>
  <PolygonLabels name="label" toName="image" strokeWidth="3" pointSize="small">
    <Label value="Text" background="green"/>
    <Label value="Handwriting" background="blue"/>
  </PolygonLabels>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
            maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>
</View>
"""

W, H = 640, 480


def result(task: Task, *detections: DetectionModel, width: int = W, height: int = H) -> DetectResult:
    return DetectResult(
        request_id="r",
        model="scripted",
        task=task,
        detections=list(detections),
        image=ImageInfo(width=width, height=height, resized_width=width, resized_height=height),
        truncated=False,
        finish_reason="stop",
        skipped=0,
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=Timings(queue_ms=0, first_detection_ms=None, total_ms=1),
    )


def dumped(prediction: object) -> dict[str, object]:
    from pydantic import BaseModel

    assert isinstance(prediction, BaseModel)
    return prediction.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---- parsing label configs ----------------------------------------------------------------------
def test_rectangle_labels_ask_for_detection_of_their_values() -> None:
    config = parse_label_config(OBJECT_DETECTION)
    (job,) = config.jobs
    assert job.params.task is Task.DETECTION
    assert job.params.categories == ["Airplane", "Car"]
    assert (job.control.name, job.image.name, job.image.data_key) == ("label", "image", "image")
    assert job.labels == {"airplane": "Airplane", "car": "Car"}
    assert config.warnings == ()


def test_predicted_values_and_underscores_are_what_the_model_is_asked() -> None:
    config = parse_label_config(
        '<View><Image name="photo" value="$url"/>'
        '<RectangleLabels name="objects" toName="photo">'
        '<Label value="Vehicle" predicted_values="car, truck"/><Label value="traffic_light"/>'
        "</RectangleLabels></View>"
    )
    (job,) = config.jobs
    assert job.params.categories == ["car", "truck", "traffic light"]
    assert job.labels == {"car": "Vehicle", "truck": "Vehicle", "traffic light": "traffic_light"}


def test_keypoint_labels_that_are_not_keypoint_names_ask_for_pointing() -> None:
    (job,) = parse_label_config(KEYPOINTS_TEMPLATE).jobs
    assert job.params.task is Task.POINTING
    assert job.params.categories == ["Face", "Nose"]
    assert (job.control.name, job.image.name, job.image.data_key) == ("kp-1", "img-1", "img")


def test_pose_config_asks_for_person_keypoints_and_leaves_person_boxes_to_them() -> None:
    config = parse_label_config(HUMAN_POSE)
    keypoint, detection = config.jobs
    assert keypoint.params.task is Task.KEYPOINT
    assert (keypoint.params.categories, keypoint.params.keypoint_type) == (["person"], "person")
    assert keypoint.box_control is not None and keypoint.box_control.name == "bbox"
    assert keypoint.box_labels == {"person": "Person"}
    assert keypoint.labels["left eye"] == "left_eye" and len(keypoint.labels) == 17
    # Persons come boxed with their keypoints; the other labels are plain detection.
    assert detection.params.task is Task.DETECTION and detection.params.categories == ["Bicycle"]
    assert detection.control.score_threshold == 0.25


def test_animal_keypoints_use_the_box_labels_as_instances() -> None:
    names = "".join(f'<Label value="{n}"/>' for n in ("root of tail", "left front paw", "nose"))
    config = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        '<RectangleLabels name="box" toName="img"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>'
        f'<KeyPointLabels name="kp" toName="img">{names}</KeyPointLabels></View>'
    )
    (job,) = config.jobs  # both box labels are the keypoint job's instances
    assert (job.params.task, job.params.keypoint_type) == (Task.KEYPOINT, "animal")
    assert job.params.categories == ["Cat", "Dog"]
    assert job.box_labels == {"cat": "Cat", "dog": "Dog"}


def test_shared_keypoint_names_read_as_person_unless_the_boxes_say_otherwise() -> None:
    shared = '<KeyPointLabels name="kp" toName="img"><Label value="Nose"/><Label value="Left Eye"/></KeyPointLabels>'
    alone = parse_label_config(f'<View><Image name="img" value="$image"/>{shared}</View>')
    assert alone.jobs[0].params.keypoint_type == "person" and alone.jobs[0].box_control is None
    horses = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        f'<RectangleLabels name="b" toName="img"><Label value="horse"/></RectangleLabels>{shared}</View>'
    )
    assert horses.jobs[0].params.keypoint_type == "animal"
    assert horses.jobs[0].params.categories == ["horse"]


def test_ocr_polygons_with_a_transcription_area() -> None:
    config = parse_label_config(OCR_POLYGONS)
    (job,) = config.jobs
    assert job.params.task is Task.OCR_POLYGON
    assert job.params.categories == ["text line"]
    assert (job.text_label, job.transcription) == ("Text", "transcription")
    assert job.image.data_key == "ocr"


def test_text_rectangles_ask_for_ocr_boxes_beside_object_detection() -> None:
    config = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="label" toName="image"><Label value="Sign"/><Label value="Word"/></RectangleLabels>'
        "</View>"
    )
    detection, ocr = config.jobs
    assert (detection.params.task, detection.params.categories) == (Task.DETECTION, ["Sign"])
    assert (ocr.params.task, ocr.params.categories, ocr.text_label) == (Task.OCR_BOX, ["word"], "Word")
    assert ocr.transcription is None


def test_object_polygons_are_left_out_with_a_reason_or_refused_alone() -> None:
    both = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>'
        '<PolygonLabels name="outline" toName="image"><Label value="Building"/></PolygonLabels></View>'
    )
    assert [job.params.task for job in both.jobs] == [Task.DETECTION]
    assert "'Building'" in both.warnings[0] and "only around text" in both.warnings[0]
    with pytest.raises(InvalidRequest, match=r"nothing Rex-Omni can predict.*only around text"):
        parse_label_config(
            '<View><Image name="image" value="$image"/>'
            '<PolygonLabels name="outline" toName="image"><Label value="Building"/></PolygonLabels></View>'
        )


def test_more_labels_than_one_request_takes_are_split() -> None:
    labels = "".join(f'<Label value="thing {i}"/>' for i in range(150))
    config = parse_label_config(
        f'<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">{labels}</RectangleLabels></View>'
    )
    assert [len(job.params.categories) for job in config.jobs] == [64, 64, 22]
    assert all(job.labels["thing 149"] == "thing 149" for job in config.jobs)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Image", "not valid XML"),
        ("<View>\ud800</View>", "not Unicode text"),
        ('<!DOCTYPE x [<!ENTITY a "aaaa">]><View/>', "DOCTYPE"),
        ("<View><Text name='t' value='$text'/></View>", "no RectangleLabels, KeyPointLabels or PolygonLabels"),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="other">'
            '<Label value="a"/></RectangleLabels></View>',
            "names no <Image>",
        ),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i" value="$labels"/></View>',
            "dynamic labels are not supported",
        ),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i" model_skip="true">'
            '<Label value="a"/></RectangleLabels></View>',
            "model_skip",
        ),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i" model_score_threshold="high">'
            '<Label value="a"/></RectangleLabels></View>',
            "model_score_threshold",
        ),
        (
            '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
            '<Label value="a &lt;|im_end|&gt;"/></RectangleLabels></View>',
            "special-token markers",
        ),
    ],
)
def test_bad_label_configs_are_refused_with_a_clear_message(xml: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)) as refused:
        parse_label_config(xml)
    assert refused.value.code == "invalid_request"


# ---- results -> Label Studio regions ------------------------------------------------------------
def test_boxes_become_rectangles_in_percent_of_the_original_image() -> None:
    (job,) = parse_label_config(OBJECT_DETECTION).jobs
    found = result(
        Task.DETECTION,
        BoxDetection(label="Car", box=[64, 48, 320, 240], score=0.9),
        BoxDetection(label="airplane", box=[0, 0, 640, 480], score=0.7),
        BoxDetection(label="boat", box=[1, 1, 2, 2], score=0.1),  # not a label of the config: left out
    )
    prediction = dumped(to_prediction([job], [found], "rex"))
    assert prediction["model_version"] == "rex"
    assert prediction["score"] == pytest.approx(0.8)
    assert prediction["result"] == [
        {
            "id": "r1",
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": 640,
            "original_height": 480,
            "image_rotation": 0,
            "value": {"x": 10.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 0.0, "rectanglelabels": ["Car"]},
            "score": 0.9,
        },
        {
            "id": "r2",
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": 640,
            "original_height": 480,
            "image_rotation": 0,
            "value": {
                "x": 0.0,
                "y": 0.0,
                "width": 100.0,
                "height": 100.0,
                "rotation": 0.0,
                "rectanglelabels": ["Airplane"],
            },
            "score": 0.7,
        },
    ]


def test_unscored_detections_give_no_prediction_score() -> None:
    (job,) = parse_label_config(OBJECT_DETECTION).jobs
    prediction = dumped(
        to_prediction([job], [result(Task.DETECTION, BoxDetection(label="Car", box=[0, 0, 1, 1]))], "v")
    )
    assert "score" not in prediction
    assert "score" not in prediction["result"][0]  # type: ignore[index]


def test_points_become_keypoints_with_a_small_width() -> None:
    (job,) = parse_label_config(KEYPOINTS_TEMPLATE).jobs
    found = result(Task.POINTING, PointDetection(label="nose", point=[320, 120], score=0.5), width=W, height=H)
    (region,) = dumped(to_prediction([job], [found], "v"))["result"]  # type: ignore[misc]
    assert region["type"] == "keypointlabels"
    assert (region["from_name"], region["to_name"]) == ("kp-1", "img-1")
    assert region["value"] == {"x": 50.0, "y": 25.0, "width": KEYPOINT_WIDTH_PERCENT, "keypointlabels": ["Nose"]}


def test_keypoint_instances_become_a_box_and_points_pointing_at_it() -> None:
    keypoint_job, detection_job = parse_label_config(HUMAN_POSE).jobs
    person = KeypointsDetection(
        label="person",
        box=[64, 48, 320, 480],
        keypoints={"nose": [160, 96], "left eye": None, "right eye": [176, 90], "tail": [1, 1]},
        score=0.8,
    )
    faint = KeypointsDetection(label="person", box=[0, 0, 10, 10], keypoints={"nose": [5, 5]}, score=0.1)
    bike = BoxDetection(label="Bicycle", box=[320, 240, 640, 480], score=0.6)
    prediction = dumped(
        to_prediction(
            [keypoint_job, detection_job], [result(Task.KEYPOINT, person, faint), result(Task.DETECTION, bike)], "v"
        )
    )
    regions = prediction["result"]
    assert isinstance(regions, list)
    box, nose, right_eye, faint_nose, bicycle = regions
    assert (box["type"], box["from_name"], box["value"]["rectanglelabels"]) == ("rectanglelabels", "bbox", ["Person"])
    assert box["value"]["height"] == pytest.approx(90.0)
    for point, label, xy in ((nose, "nose", (25.0, 20.0)), (right_eye, "right_eye", (27.5, 18.75))):
        assert (point["type"], point["from_name"], point["parentID"]) == ("keypointlabels", "keypoints", box["id"])
        assert point["value"]["keypointlabels"] == [label]
        assert (point["value"]["x"], point["value"]["y"]) == pytest.approx(xy)
    # The RectangleLabels' threshold (0.25) keeps the faint instance's box out, not its points.
    assert faint_nose["type"] == "keypointlabels" and "parentID" not in faint_nose
    assert bicycle["value"]["rectanglelabels"] == ["Bicycle"]
    assert prediction["score"] == pytest.approx((0.8 + 0.1 + 0.6) / 3)


def test_score_threshold_of_a_control_drops_weak_detections() -> None:
    config = parse_label_config(HUMAN_POSE)
    detection_job = config.jobs[1]
    weak = BoxDetection(label="Bicycle", box=[0, 0, 1, 1], score=0.2)
    strong = BoxDetection(label="Bicycle", box=[0, 0, 1, 1], score=0.3)
    prediction = to_prediction([detection_job], [result(Task.DETECTION, weak, strong)], "v")
    assert [region.score for region in prediction.result] == [0.3]
    assert prediction.score == 0.3


def test_ocr_polygons_carry_their_text_in_the_transcription_area() -> None:
    (job,) = parse_label_config(OCR_POLYGONS).jobs
    words = PolygonDetection(label="Hello", polygon=[[0, 0], [320, 0], [320, 240], [0, 240]], score=0.9)
    prediction = dumped(to_prediction([job], [result(Task.OCR_POLYGON, words)], "v"))
    polygon, text = prediction["result"]  # type: ignore[misc]
    points = [[0.0, 0.0], [50.0, 0.0], [50.0, 50.0], [0.0, 50.0]]
    assert polygon["id"] == text["id"]
    assert (polygon["type"], polygon["from_name"]) == ("polygonlabels", "label")
    assert polygon["value"] == {"points": points, "polygonlabels": ["Text"]}
    assert (text["type"], text["from_name"], text["to_name"]) == ("textarea", "transcription", "image")
    assert text["value"] == {"points": points, "text": ["Hello"]}


def test_ocr_boxes_without_a_transcription_area_keep_the_text_in_meta() -> None:
    config = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="label" toName="image"><Label value="Text"/></RectangleLabels></View>'
    )
    word = BoxDetection(label="EXIT", box=[64, 48, 128, 96], score=None)
    (region,) = dumped(to_prediction(list(config.jobs), [result(Task.OCR_BOX, word)], "v"))["result"]  # type: ignore[misc]
    assert region["value"]["rectanglelabels"] == ["Text"]
    assert region["meta"] == {"text": ["EXIT"]}


def test_region_ids_are_unique_across_a_tasks_jobs() -> None:
    config = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="label" toName="image"><Label value="Sign"/><Label value="Text"/></RectangleLabels>'
        '<TextArea name="t" toName="image" perRegion="true"/></View>'
    )
    detection, ocr = config.jobs
    signs = result(Task.DETECTION, BoxDetection(label="sign", box=[0, 0, 5, 5]))
    texts = result(Task.OCR_BOX, BoxDetection(label="STOP", box=[1, 1, 4, 4]))
    regions = to_prediction([detection, ocr], [signs, texts], "v").result
    assert [(r.id, r.type) for r in regions] == [
        ("r1", "rectanglelabels"),
        ("r2", "rectanglelabels"),
        ("r2", "textarea"),
    ]


def test_failed_prediction_keeps_its_place_with_the_reason() -> None:
    assert dumped(failed_prediction("v", "invalid_image", "gone")) == {
        "model_version": "v",
        "result": [],
        "error": {"code": "invalid_image", "message": "gone"},
    }


# ---- image references ---------------------------------------------------------------------------
BASE = "http://label-studio:8080"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="),
        ("https://images.example/cat.jpg", ImageLocation("https://images.example/cat.jpg", False)),
        ("http://label-studio:8080/data/upload/3/a.jpg", ImageLocation(f"{BASE}/data/upload/3/a.jpg", True)),
        ("http://label-studio/data/upload/3/a.jpg", ImageLocation("http://label-studio/data/upload/3/a.jpg", False)),
        (
            "/data/upload/3/1f2e-photo.jpg",
            ImageLocation(
                f"{BASE}/data/upload/3/1f2e-photo.jpg",
                True,
                f"{BASE}/storage-data/uploaded/?filepath=upload/3/1f2e-photo.jpg",
            ),
        ),
        (
            "upload/3/x.png",
            ImageLocation(
                f"{BASE}/data/upload/3/x.png", True, f"{BASE}/storage-data/uploaded/?filepath=upload/3/x.png"
            ),
        ),
        ("/data/local-files/?d=images/cat.jpg", ImageLocation(f"{BASE}/data/local-files/?d=images/cat.jpg", True)),
        ("/tasks/7/resolve/?fileuri=czM6Ly9i", ImageLocation(f"{BASE}/tasks/7/resolve/?fileuri=czM6Ly9i", True)),
        (
            "s3://bucket/dir/cat.jpg",
            ImageLocation(f"{BASE}/tasks/7/presign/?fileuri=s3%3A%2F%2Fbucket%2Fdir%2Fcat.jpg", True),
        ),
    ],
)
def test_image_references_are_located(reference: str, expected: ImageLocation | str) -> None:
    assert locate_image(reference, 7, BASE + "/") == expected


@pytest.mark.parametrize(
    ("reference", "base", "message"),
    [
        ("/data/upload/3/a.jpg", "", "set REXOMNI_LABEL_STUDIO_URL"),
        ("ftp://files.example/a.jpg", BASE, "not a URL this server can fetch"),
        ("file:///etc/passwd", BASE, "not a URL this server can fetch"),
        ("http://[broken/a.jpg", BASE, "not a valid URL"),
    ],
)
def test_unusable_image_references_are_refused(reference: str, base: str, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        locate_image(reference, 7, base)


@given(
    st.one_of(
        st.text(),
        st.from_regex(r"(https?|s3|gs|ftp|data):/*[^ ]{0,30}", fullmatch=True),
        st.from_regex(r"/data/(upload|local-files)/.{0,30}", fullmatch=True),
    ),
    st.one_of(st.none(), st.integers(), st.text(max_size=5)),
    st.sampled_from(["", BASE, "https://ls.example:8443/"]),
)
def test_any_reference_is_located_or_refused_as_an_invalid_image(reference: str, task_id: object, base: str) -> None:
    try:
        located = locate_image(reference, task_id, base)  # type: ignore[arg-type]
    except InvalidImage as refused:
        refused.message.encode("utf-8")  # an answer can carry it
        return
    if isinstance(located, ImageLocation):
        assert located.url.casefold().startswith(("http://", "https://"))
        assert not located.label_studio or (base and located.url.startswith(base.rstrip("/")))
        located.described().encode("utf-8")
    else:
        assert located.startswith("data:")


def test_a_task_without_its_image_key_says_which_keys_it_has() -> None:
    (job,) = parse_label_config(OBJECT_DETECTION).jobs
    assert job.image.reference(LabelStudioTask(id=1, data={"$undefined$": " /data/upload/1/a.png "})) == (
        "/data/upload/1/a.png"
    )
    with pytest.raises(InvalidImage, match=r"data\.image .*keys: photo, text"):
        job.image.reference(LabelStudioTask(id=1, data={"photo": "x", "text": "y"}))


# ---- tokens -------------------------------------------------------------------------------------
def jwt(payload: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


def test_personal_access_tokens_are_unexpired_jwts_and_legacy_tokens_are_not() -> None:
    assert jwt_expiry(jwt({"exp": 2_000_000_000, "token_type": "refresh"})) == 2_000_000_000
    assert is_personal_access_token(jwt({"exp": 2_000_000_000}), now=1_900_000_000)
    assert not is_personal_access_token(jwt({"exp": 1_000}), now=1_900_000_000)  # expired: sent as it is
    assert not is_personal_access_token(jwt({"sub": "1"}))  # no expiry
    assert not is_personal_access_token("9f8e7d6c5b4a39281706f5e4d3c2b1a098765432")  # a legacy token
    assert jwt_expiry("a.b.c") is None and jwt_expiry("") is None


# ---- Label Studio's request bodies --------------------------------------------------------------
def test_predict_body_as_label_studio_sends_it() -> None:
    body = {
        "tasks": [
            {
                "id": 7,
                "data": {"image": "/data/upload/3/1f2e-photo.jpg"},
                "meta": {},
                "created_at": "2024-05-02T10:00:00.000000Z",
                "updated_at": "2024-05-02T10:00:00.000000Z",
                "is_labeled": False,
                "overlap": 1,
                "inner_id": 7,
                "total_annotations": 0,
                "cancelled_annotations": 0,
                "total_predictions": 0,
                "comment_count": 0,
                "unresolved_comment_count": 0,
                "last_comment_updated_at": None,
                "project": 3,
                "updated_by": None,
                "file_upload": 12,
                "comment_authors": [],
            }
        ],
        "project": "3.1714644000",
        "label_config": OBJECT_DETECTION,
        "params": {"login": None, "password": None, "context": None},
    }
    request = PredictRequest.model_validate_json(json.dumps(body))
    assert request.tasks[0].id == 7 and request.tasks[0].data == {"image": "/data/upload/3/1f2e-photo.jpg"}
    assert project_id(request.project) == "3"
    assert request.label_config == OBJECT_DETECTION


def test_setup_body_as_label_studio_sends_it() -> None:
    body = {
        "project": "3.1714644000",
        "schema": OBJECT_DETECTION,
        "hostname": "http://localhost:8080",
        "access_token": "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432",
        "extra_params": None,
    }
    setup = SetupRequest.model_validate(body)
    assert (setup.label_config, setup.hostname) == (OBJECT_DETECTION, "http://localhost:8080")
    assert project_id(setup.project) == "3" and project_id(None) is None and project_id(12) == "12"


def test_percentages_stay_inside_the_image() -> None:
    (job,) = parse_label_config(OBJECT_DETECTION).jobs
    outside = BoxDetection(label="Car", box=[-5, -5, 700, 500])
    (region,) = to_prediction([job], [result(Task.DETECTION, outside)], "v").result
    value = region.value.model_dump()
    assert (value["x"], value["y"], value["width"], value["height"]) == (0.0, 0.0, 100.0, 100.0)
    assert all(math.isfinite(v) for v in (value["x"], value["width"]))
