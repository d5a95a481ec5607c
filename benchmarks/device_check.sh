#!/usr/bin/env bash
# The checks that need the device machine (one GPU, 16 cores), as one short script.
#
# Prepare here (once per session; the device machine cannot fetch):
#   echo /.whl/ >> .git/info/exclude
#   for p in fastapi starlette pydantic pydantic-core annotated-types typing-inspection \
#            uvicorn httptools rich markdown-it-py mdurl pygments pyyaml; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$p"; done
# then run this with the device tool, carrying .whl:  bash benchmarks/device_check.sh
# What it runs:
#  1. every CUDA test (sync-free hot path, GPU vs CPU values, the side stream, CUDA-graph
#     replays, the sketch, the sink's pinned copies);
#  2. `repwatch bench --device cuda` (ResNet-50/ViT-B training overhead, update vs GEMM,
#     publish vs eigvalsh, naive baselines, memory) into $OUT/bench_cuda.json;
#  3. the sidecar throughput benchmark with the sidecar pinned to two cores and the clients on
#     others (the deployment it is built for; the 2-core CI machine cannot separate them).
# The ONNX Runtime CUDA execution provider needs the onnxruntime-gpu wheel, too large to carry
# (> 64 MiB): its test skips there.
set -u
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/transport/test_sender.py \
  tests/scorers/test_generative.py tests/scorers/test_neural_collapse.py \
  tests/scorers/test_activations.py tests/scorers/test_sketch.py tests/sidecar/test_kernels.py \
  2>&1 | tee "$OUT/cuda_tests.txt"
timeout 300 python3 -m monitor.cli bench --device cuda --only training_overhead update_throughput \
  publish_vs_eigvalsh naive_svdvals naive_item memory --out "$OUT/bench_cuda.json" 2>&1 \
  | grep -v "INFO\|WARNING" | tee "$OUT/bench_cuda.txt"
for client in raw shm; do
  python3 benchmarks/sidecar_throughput.py --backend onnx --batches 1000 --rows 256 --dim 128 \
    --client "$client" --clients 4 --server-cores 0,1 --client-cores 2-9 2>&1 \
    | grep -v INFO | tee -a "$OUT/sidecar_throughput.txt"
done
