#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (device tool; see README "GPU latency curve and tests"):
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_site"], timeout_s=600)
# Unpacks the packages scripts/gpu_site.sh packed, records the GPU, runs `make test-gpu`'s tests (the image's
# python3 and torch, the project's other packages) and the quantized-expert benchmark on CUDA. Logs and JSON go to
# $OUT (the device tool brings them back).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -f .gpu_site/site312.tar.xz ]; then
    tar xJf .gpu_site/site312.tar.xz -C /tmp && export PYTHONPATH=/tmp/site312:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm,temperature.gpu,memory.used \
    --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, ray; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, ray.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout "${GPU_TEST_TIMEOUT_S:-420}" python3 -m pytest -q -m gpu tests -p no:cacheprovider --timeout 300 \
    --durations 12 2>&1 | tee "$OUT/test_gpu.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/test_gpu.log"
timeout 120 python3 -m service.bench_quantized --device cuda --out "$OUT" 2>&1 | tail -20
