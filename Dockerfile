# The backend image: CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# (or any CUDA index) for GPU serving and training.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    RLHF_DATA_DIR=/data \
    RLHF_PORT=9090

WORKDIR /app
# torch first and pinned, so nothing later pulls an unpinned (CUDA) build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple
COPY pyproject.toml README.md ./
COPY rlhf_core rlhf_core
COPY ml_backend ml_backend
COPY trainer trainer
COPY rlhf_cli rlhf_cli
COPY label_configs label_configs
RUN pip install .

VOLUME /data
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health')"
CMD ["rlhf-backend", "serve"]
