"""Forced outputs for vLLM (tests and benchmarks only): the same facility as
``engines.forced`` for transformers, as a vLLM V1 logits processor.

Registered with the engine only when the server allows forced outputs. A request opts in by
carrying ``forced_token_ids`` (and ``forced_eos_id``) in ``SamplingParams.extra_args``; the
per-request processor then allows only the next forced token, then end-of-turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class ForcedOutputProcessor(AdapterLogitsProcessor):  # type: ignore[misc]
    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def new_req_logits_processor(self, params: Any) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        extra = params.extra_args or {}
        forced: list[int] | None = extra.get("forced_token_ids")
        if forced is None:
            return None
        eos: int = extra["forced_eos_id"]

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            step = len(output_ids)
            allowed = forced[step] if step < len(forced) else eos
            out = torch.full_like(logits, float("-inf"))
            out[allowed] = 0.0
            return out

        return force
