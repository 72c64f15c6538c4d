"""Prometheus metrics on an explicit registry (one per server, so tests can read their own).

Buckets suit seconds-long generations: Rex-Omni's latency grows ~40 ms per box on an A100, so
a dense image takes 10-20 s and a runaway output a minute.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rexomni_server.vocabulary import PIXEL_UNIT

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 300.0)
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
PIXEL_BUCKETS = tuple(n * PIXEL_UNIT for n in (16, 64, 256, 512, 1024, 2048, 2560, 4096, 8192, 16384))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rexomni_requests", "Finished requests.", ["task", "transport", "status"], registry=r)
        self.latency = Histogram(
            "rexomni_request_duration_seconds",
            "Arrival to last byte of the result.",
            ["task", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_detection = Histogram(
            "rexomni_time_to_first_detection_seconds",
            "Arrival to the first parsed detection.",
            ["task", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rexomni_queue_wait_seconds",
            "Arrival to the start of generation.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.detections = Histogram(
            "rexomni_detections_per_request",
            "Detections returned.",
            ["task"],
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "rexomni_generated_tokens", "Completion tokens generated.", ["task"], registry=r
        )
        self.prompt_tokens = Counter("rexomni_prompt_tokens", "Prompt tokens processed.", ["task"], registry=r)
        self.truncated = Counter(
            "rexomni_truncated_outputs", "Outputs cut off by max_new_tokens.", ["task"], registry=r
        )
        self.finish_reasons = Counter(
            "rexomni_finish_reasons",
            "Why generations ended: stop, length, abort, max_detections, repetition.",
            ["task", "reason"],
            registry=r,
        )
        self.parse_skipped = Counter(
            "rexomni_parse_skipped", "Unparseable output pieces skipped.", ["task"], registry=r
        )
        self.tiles = Counter(
            "rexomni_tiles", "Tiles run by tiled requests (the whole-image pass included).", ["task"], registry=r
        )
        self.in_flight = Gauge("rexomni_in_flight_requests", "Requests admitted and not finished.", registry=r)
        self.queue_depth = Gauge("rexomni_queue_depth", "Admitted requests not yet generating.", registry=r)
        self.image_pixels = Histogram(
            "rexomni_image_pixels",
            "Pixels of each resized image the model saw (each tile of a tiled request).",
            buckets=PIXEL_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
