"""Tiled detection on real loopback servers with the tiny model: tiles stream over SSE and gRPC
with the same merged answer, refusals are 422 / INVALID_ARGUMENT, and tiles are counted."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import httpx

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectParams
from rexomni_server.transport.convert import detection_from_pb, params_to_pb, result_from_pb
from rexomni_server.vocabulary import MAX_BIN
from tests.support import image_bytes, metric_value, sse_events

# 640 x 480 in 392-pixel tiles overlapping by 20 %: a 2 x 2 grid and the whole-image pass.
PNG = image_bytes(640, 480)
TILING = {"tile_size": 392, "overlap": 0.2}
BOX = "<|object_ref_start|>person<|object_ref_end|><|box_start|><400><400><600><600><|box_end|>"
# Each grid tile finds a person in its middle; the whole image finds nothing.
FORCED = [BOX, BOX, BOX, BOX, ""]


def fields(**options: Any) -> dict[str, Any]:
    return {"categories": ["person"], "options": {"tiling": TILING, "forced_tile_outputs": FORCED, **options}}


def expected_boxes(tiles: list[dict[str, Any]]) -> list[list[float]]:
    """A box in the middle of each grid tile, mapped back to the image by the tile's origin."""

    def at(bin_index: int, size: int, start: int) -> float:
        return bin_index / MAX_BIN * size + start

    return sorted(
        [
            at(400, t["x1"] - t["x0"], t["x0"]),
            at(400, t["y1"] - t["y0"], t["y0"]),
            at(600, t["x1"] - t["x0"], t["x0"]),
            at(600, t["y1"] - t["y0"], t["y0"]),
        ]
        for t in tiles
        if not t["whole"]
    )


async def test_a_tiled_request_streams_over_sse_and_grpc_with_the_same_merged_answer(
    live_servers: tuple[str, str],
) -> None:
    url, target = live_servers
    body = {"image": base64.b64encode(PNG).decode(), **fields()}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        before = metric_value((await client.get("/metrics")).text, "rexomni_tiles_total")
        async with client.stream("POST", "/v1/detect/stream", json=body) as response:
            assert response.status_code == 200
            events = [(name, data) async for name, data, _ in sse_events(response)]
        after = metric_value((await client.get("/metrics")).text, "rexomni_tiles_total")
    names = [name for name, _ in events]
    assert names == ["detection"] * 4 + ["done"]
    done = events[-1][1]
    streamed = [data["detection"] for name, data in events if name == "detection"]
    assert done["detections"] == streamed
    assert len(done["tiles"]) == 5 and done["tiles"][-1]["whole"]
    assert sorted(d["box"] for d in streamed) == expected_boxes(done["tiles"])
    assert after - before == 5
    assert done["usage"]["completion_tokens"] >= 4 * 10  # every tile's answer counted

    request = params_to_pb(DetectParams.model_validate(fields()), PNG)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        unary = result_from_pb(await stub.Detect(request))
        stream = [event async for event in stub.DetectStream(request)]
    assert sorted(d.model_dump()["box"] for d in unary.detections) == expected_boxes(done["tiles"])
    assert unary.tiles is not None and [t.model_dump() for t in unary.tiles] == done["tiles"]
    grpc_streamed = [detection_from_pb(e.detection.detection) for e in stream[:-1]]
    assert grpc_streamed == result_from_pb(stream[-1].done).detections and len(grpc_streamed) == 4


async def test_tiling_refusals_are_client_errors_and_the_server_goes_on(live_servers: tuple[str, str]) -> None:
    url, target = live_servers
    image = base64.b64encode(PNG).decode()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        gui = {"image": image, "task": "gui_grounding", "categories": ["the OK button"], "options": {"tiling": "auto"}}
        refused = await client.post("/v1/detect", json=gui)
        assert refused.status_code == 422 and "cannot apply to task 'gui_grounding'" in refused.text
        miscounted = {"image": image, **fields(forced_tile_outputs=[BOX])}
        refused = await client.post("/v1/detect", json=miscounted)
        assert refused.status_code == 422 and "tiled into 5 tiles" in refused.text
        bad = {"image": image, "categories": ["a"], "options": {"tiling": {"overlap": 0.9}}}
        assert (await client.post("/v1/detect", json=bad)).status_code == 422
    visual = DetectParams.model_validate(
        {"task": "visual_prompting", "visual_prompt_boxes": [[1, 2, 30, 40]], "options": {"tiling": "auto"}}
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        try:
            await stub.Detect(params_to_pb(visual, PNG))
            raise AssertionError("visual prompting with tiling was accepted")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "visual_prompting" in (err.details() or "")
        result = await stub.Detect(params_to_pb(DetectParams.model_validate(fields()), PNG))
    assert len(result.detections) == 4 and isinstance(result, pb.DetectResponse)
