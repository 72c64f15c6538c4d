# Rex-Omni server for NVIDIA GPUs (A100/H100) on the vLLM engine.
#   docker build -t rexomni .
#   docker run --gpus all -p 8000:8000 -p 50051:50051 -v ~/.cache/huggingface:/root/.cache/huggingface rexomni
# The base image brings vLLM with its matching CUDA torch, torchvision and transformers; our
# package adds the server on top and may never replace them: they are pinned to the image's
# own versions while it installs (a conflict fails the build instead of breaking vLLM).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    REXOMNI_HOST=0.0.0.0 \
    REXOMNI_PORT=8000 \
    REXOMNI_GRPC_PORT=50051 \
    REXOMNI_ENGINE=vllm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN python3 -m pip freeze | grep -iE '^(torch|torchvision|transformers|tokenizers|vllm)==' > /tmp/image-pins.txt \
 && python3 -m pip install --constraint /tmp/image-pins.txt . \
 && rexomni-server --help >/dev/null

EXPOSE 8000 50051
# The model loads for a minute or more on first start (download + CUDA graphs).
# With REXOMNI_TLS_CERT_FILE set the port speaks HTTPS (the probe skips verification: it is localhost).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
  CMD python3 -c "import os,ssl,sys,urllib.request as u; tls=bool(os.environ.get('REXOMNI_TLS_CERT_FILE')); sys.exit(u.urlopen(('https' if tls else 'http')+'://127.0.0.1:8000/ready', context=ssl._create_unverified_context() if tls else None).status != 200)"
ENTRYPOINT ["rexomni-server", "serve"]
