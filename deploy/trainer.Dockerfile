# repwatch demo trainer: `repwatch demo` (SimSiam on scikit-learn digits, torch CPU build) that
# ships its sampled embeddings to a repwatch sidecar instead of scoring them in-process.
# Used by deploy/compose.yml and the Kubernetes example (deploy/k8s/example). Build from the repo root:
#
#   docker build -f deploy/trainer.Dockerfile -t repwatch-trainer .
#
# Your own trainer image only needs `pip install repwatch` (with torch) next to your code.
# TORCH_INDEX_URL picks the torch build: the CPU wheels by default (small; the demo trains in
# seconds on a CPU); pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple for a CUDA build.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY monitor ./monitor
COPY exporters ./exporters

# torch first from its index, so that installing the package (which requires torch) keeps it;
# httpx: the demo reads the sidecar's status over HTTP.
RUN pip install --index-url "$TORCH_INDEX_URL" torch \
    && pip install ".[demo]" "httpx>=0.27" \
    && useradd --system --uid 10001 --no-create-home repwatch

# The sidecar image's UID: a shm:// ring (mode 0600) is shared only between equal UIDs.
USER 10001
ENTRYPOINT ["repwatch", "demo"]
CMD ["--sink", "http://sidecar:9400", "--token-file", "/run/secrets/repwatch-token", "--collapse-at", "300", "--steps", "700"]
