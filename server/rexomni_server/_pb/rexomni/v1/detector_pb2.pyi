from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_DETECTION: _ClassVar[Task]
    TASK_POINTING: _ClassVar[Task]
    TASK_VISUAL_PROMPTING: _ClassVar[Task]
    TASK_KEYPOINT: _ClassVar[Task]
    TASK_OCR_BOX: _ClassVar[Task]
    TASK_OCR_POLYGON: _ClassVar[Task]
    TASK_GUI_GROUNDING: _ClassVar[Task]
    TASK_GUI_POINTING: _ClassVar[Task]
TASK_UNSPECIFIED: Task
TASK_DETECTION: Task
TASK_POINTING: Task
TASK_VISUAL_PROMPTING: Task
TASK_KEYPOINT: Task
TASK_OCR_BOX: Task
TASK_OCR_POLYGON: Task
TASK_GUI_GROUNDING: Task
TASK_GUI_POINTING: Task

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("max_new_tokens", "min_pixels", "max_pixels", "return_raw_output", "forced_output", "max_detections", "stop_on_repetition", "fan_out", "scores", "priority", "tiling", "forced_tile_outputs")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    RETURN_RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORCED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_REPETITION_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    FORCED_TILE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    min_pixels: int
    max_pixels: int
    return_raw_output: bool
    forced_output: str
    max_detections: int
    stop_on_repetition: bool
    fan_out: bool
    scores: bool
    priority: int
    tiling: Tiling
    forced_tile_outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: _Optional[int] = ..., min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ..., return_raw_output: _Optional[bool] = ..., forced_output: _Optional[str] = ..., max_detections: _Optional[int] = ..., stop_on_repetition: _Optional[bool] = ..., fan_out: _Optional[bool] = ..., scores: _Optional[bool] = ..., priority: _Optional[int] = ..., tiling: _Optional[_Union[Tiling, _Mapping]] = ..., forced_tile_outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class Tiling(_message.Message):
    __slots__ = ("tile_size", "overlap", "whole_image", "iou_threshold")
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    WHOLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    tile_size: int
    overlap: float
    whole_image: bool
    iou_threshold: float
    def __init__(self, tile_size: _Optional[int] = ..., overlap: _Optional[float] = ..., whole_image: _Optional[bool] = ..., iou_threshold: _Optional[float] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("image", "task", "categories", "keypoint_type", "visual_prompt_boxes", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    KEYPOINT_TYPE_FIELD_NUMBER: _ClassVar[int]
    VISUAL_PROMPT_BOXES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    task: Task
    categories: _containers.RepeatedScalarFieldContainer[str]
    keypoint_type: str
    visual_prompt_boxes: _containers.RepeatedCompositeFieldContainer[Box]
    options: DetectOptions
    def __init__(self, image: _Optional[bytes] = ..., task: _Optional[_Union[Task, str]] = ..., categories: _Optional[_Iterable[str]] = ..., keypoint_type: _Optional[str] = ..., visual_prompt_boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("name", "point")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    point: Point
    def __init__(self, name: _Optional[str] = ..., point: _Optional[_Union[Point, _Mapping]] = ...) -> None: ...

class Keypoints(_message.Message):
    __slots__ = ("box", "keypoints")
    BOX_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    box: Box
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("label", "score", "box", "point", "polygon", "keypoints")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    POLYGON_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    box: Box
    point: Point
    polygon: Polygon
    keypoints: Keypoints
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., point: _Optional[_Union[Point, _Mapping]] = ..., polygon: _Optional[_Union[Polygon, _Mapping]] = ..., keypoints: _Optional[_Union[Keypoints, _Mapping]] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("width", "height", "resized_width", "resized_height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIZED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    resized_width: int
    resized_height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., resized_width: _Optional[int] = ..., resized_height: _Optional[int] = ...) -> None: ...

class TileInfo(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1", "whole", "resized_width", "resized_height")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    RESIZED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    whole: bool
    resized_width: int
    resized_height: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ..., whole: _Optional[bool] = ..., resized_width: _Optional[int] = ..., resized_height: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "first_detection_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DETECTION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    first_detection_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., first_detection_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("request_id", "model", "task", "detections", "image", "truncated", "finish_reason", "skipped", "usage", "timings", "raw_output", "duplicates", "tiles", "tiled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    task: Task
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    image: ImageInfo
    truncated: bool
    finish_reason: str
    skipped: int
    usage: Usage
    timings: Timings
    raw_output: str
    duplicates: int
    tiles: _containers.RepeatedCompositeFieldContainer[TileInfo]
    tiled: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ..., truncated: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., skipped: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., raw_output: _Optional[str] = ..., duplicates: _Optional[int] = ..., tiles: _Optional[_Iterable[_Union[TileInfo, _Mapping]]] = ..., tiled: _Optional[bool] = ...) -> None: ...

class DetectionEvent(_message.Message):
    __slots__ = ("index", "detection", "elapsed_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    detection: Detection
    elapsed_ms: float
    def __init__(self, index: _Optional[int] = ..., detection: _Optional[_Union[Detection, _Mapping]] = ..., elapsed_ms: _Optional[float] = ...) -> None: ...

class DetectEvent(_message.Message):
    __slots__ = ("detection", "done")
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    detection: DetectionEvent
    done: DetectResponse
    def __init__(self, detection: _Optional[_Union[DetectionEvent, _Mapping]] = ..., done: _Optional[_Union[DetectResponse, _Mapping]] = ...) -> None: ...
