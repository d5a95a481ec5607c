# repwatch sidecar image: `repwatch serve` with the ONNX Runtime backend — no torch.
#
#   docker build -t repwatch-sidecar .
#   docker run --rm -p 9400:9400 -v /path/token:/run/secrets/repwatch-token:ro repwatch-sidecar
#
# Binds 0.0.0.0 inside the container, so a bearer token is required (mount it at
# /run/secrets/repwatch-token); `repwatch serve` refuses a non-loopback address without one.
# For a GPU, build FROM a CUDA runtime image and install onnxruntime-gpu instead of onnxruntime.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY monitor ./monitor
COPY exporters ./exporters

# The package's own dependency list includes torch (for the trainer side); the sidecar needs
# only the rest of it and the sidecar extra (a test keeps this list equal to pyproject.toml's),
# so the package is installed without its dependencies.
RUN pip install "numpy>=1.24" "array-api-compat>=1.11" "prometheus-client>=0.20" "fastapi>=0.110" "uvicorn>=0.29" \
        "rich>=13" "httpx>=0.27" "markdown-it-py>=3" "starlette>=0.36" "pydantic>=2" "pyyaml>=6" \
        "onnxruntime>=1.17" "uvicorn[standard]>=0.29" "threadpoolctl>=3.1" \
    && pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home repwatch

USER 10001
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9400/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["repwatch", "serve"]
CMD ["--host", "0.0.0.0", "--port", "9400", "--backend", "onnx", "--token-file", "/run/secrets/repwatch-token"]
