#!/usr/bin/env bash
# Downloads the small pure-Python dependencies the GPU run needs beside PyTorch/transformers
# into benchmarks/gpu/wheels (ignored by git), for the GPU machine's Python version.
#   PY_VERSION=3.12 bash benchmarks/gpu/fetch_wheels.sh      # the GPU machines' Python
set -euo pipefail
cd "$(dirname "$0")"
PY_VERSION=${PY_VERSION:-3.12}
rm -rf wheels && mkdir wheels
pip download --quiet --dest wheels --only-binary=:all: --python-version "$PY_VERSION" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  fastapi fastapi-offline uvicorn pydantic pydantic-settings python-multipart sse-starlette httpx httpx-sse \
  prometheus-client grpcio grpcio-health-checking grpcio-reflection protobuf pytest pytest-asyncio \
  starlette anyio h11 httpcore idna sniffio typing-extensions annotated-types typing-inspection \
  pydantic-core python-dotenv click iniconfig pluggy packaging
du -sh wheels
