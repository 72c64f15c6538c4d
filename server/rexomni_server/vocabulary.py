"""Words the model, the engines, the service and the transports share, defined once.

Each is a fact of Rex-Omni (its coordinate bins, its end marker, Qwen2.5-VL's image unit) or of
our wire contract (finish reasons, message sizes); every module imports it from here.
"""

from __future__ import annotations

from typing import Literal

# Every coordinate is one of NUM_BINS tokens ``<0>``..``<999>``.
NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1

# The chat template's end of a turn: the model ends its answer with it.
END_MARKER = "<|im_end|>"

# Qwen2.5-VL's image unit: 14-pixel patches merged 2x2, so resized sides are multiples of 28
# and each 28x28 square is one image token.
PATCH_SIDE = 28
PIXEL_UNIT = PATCH_SIDE * PATCH_SIDE

# Why an answer ended. Engines report the first three; the service adds its own early stops.
FinishReason = Literal["stop", "length", "abort", "max_detections", "repetition"]
# A request fanned out over several engine requests ends with the most telling of their
# reasons, in this order (then "stop").
FINISH_PRECEDENCE: tuple[FinishReason, ...] = ("repetition", "length", "abort")

# The largest gRPC message the Python clients send and receive, and the server sends: a result
# with every detection of a long answer and its raw output fits with room to spare.
MAX_MESSAGE_BYTES = 64 << 20
# Room over the largest accepted image for the rest of a request (fields, JSON, base64 padding).
REQUEST_OVERHEAD_BYTES = 1 << 20
