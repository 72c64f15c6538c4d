"""Tiled detection on the vLLM engine for real (CPU build, tiny checkpoint): tiles times
categories batched as engine requests of their own, an object cut by a tile edge fused, scores
carried, every tile counted."""

from __future__ import annotations

import base64

import httpx
import pytest

from rexomni_server.serve import RunningServers
from rexomni_server.vocabulary import MAX_BIN
from tests.support import image_bytes, metric_value, phrase_group

pytestmark = pytest.mark.vllm

# 640 x 480 in 392-pixel tiles overlapping by 20 %: x from 0 and 248, y from 0 and 88.
PNG = image_bytes(640, 480)
TILE = 392


def at(bin_index: int, start: int = 0) -> float:
    return bin_index / MAX_BIN * TILE + start


async def test_tiles_and_categories_batch_and_a_cut_person_is_fused(vllm_servers: RunningServers) -> None:
    # The person spans x 200..500 across the top two tiles (cut at the right of the first, at the
    # left of the second); the bottom-right tile finds a car in its interior.
    answers = [
        phrase_group("person", 510, 255, 999, 510),
        phrase_group("person", 0, 255, 642, 510),
        "",
        phrase_group("car", 300, 300, 600, 600),
    ]
    body = {
        "image": base64.b64encode(PNG).decode(),
        "categories": ["person", "car"],  # fanned out on vLLM: 2 engine requests per tile
        "options": {
            "tiling": {"tile_size": TILE, "overlap": 0.2, "whole_image": False},
            "forced_tile_outputs": answers,
        },
    }
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vllm_servers.http_port}", timeout=120) as client:
        before = metric_value((await client.get("/metrics")).text, "rexomni_tiles_total")
        result = (await client.post("/v1/detect", json=body)).json()
        after = metric_value((await client.get("/metrics")).text, "rexomni_tiles_total")
    boxes = {d["label"]: d["box"] for d in result["detections"]}
    assert len(result["detections"]) == 2, result["detections"]
    assert boxes["person"] == [at(510), at(255), at(642, 248), at(510)]
    assert boxes["car"] == [at(300, 248), at(300, 88), at(600, 248), at(600, 88)]
    assert all(0 < d["score"] <= 1 for d in result["detections"])
    assert [(t["x0"], t["y0"]) for t in result["tiles"]] == [(0, 0), (248, 0), (0, 88), (248, 88)]
    assert after - before == 4 and result["finish_reason"] == "stop"
