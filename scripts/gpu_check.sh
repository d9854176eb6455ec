#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (device tool; see README "GPU latency curve and tests"):
#   run(command="bash scripts/gpu_check.sh [tests] [quantized] [serving] [profile]", carry=[".gpu_site"], timeout_s=600)
# Unpacks the packages scripts/gpu_site.sh packed, records the GPU, then runs the stages named (all four if none):
#   tests      `make test-gpu`'s tests (the image's python3 and torch, the project's other packages)
#   quantized  the quantized-expert benchmark on CUDA (service.bench_quantized)
#   serving    the serving benchmark on CUDA: the embedded model, and a random Qwen3-MoE of Qwen3-30B-A3B's layer
#              width (scripts/wide_moe.py, 4 layers, bfloat16)
#   profile    where the engine's decode steps of that wide model spend their time (scripts/profile_engine.py)
# Logs and JSON go to $OUT (the device tool brings them back). Exits 3 when torch sees no GPU (every GPU test would
# skip and pass), else non-zero when a stage failed (each stage still runs; failed ones are listed at the end).
# The stages' own limits add up to 20 minutes: within one call's 600 s, name one or two.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
stages=${*:-tests quantized serving profile}
if [ -f .gpu_site/site312.tar.xz ]; then
    tar xJf .gpu_site/site312.tar.xz -C /tmp && export PYTHONPATH=/tmp/site312:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm,temperature.gpu,memory.used \
    --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, ray; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, ray.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
if ! python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "torch sees no GPU: nothing checked" | tee -a "$OUT/gpu.txt"
    exit 3
fi
failed=""
wide_model() {  # the random wide model, written once
    [ -f /tmp/wide-moe/config.json ] || timeout 120 python3 scripts/wide_moe.py --out /tmp/wide-moe --layers 4 \
        --device cuda 2>&1 | tail -1
}
for stage in $stages; do
    echo "=== $stage"
    case $stage in
    tests)
        timeout "${GPU_TEST_TIMEOUT_S:-420}" python3 -m pytest -q -m gpu tests -p no:cacheprovider --timeout 300 \
            --durations 12 2>&1 | tee "$OUT/test_gpu.log"
        rc=${PIPESTATUS[0]}
        echo "pytest exit: $rc" | tee -a "$OUT/test_gpu.log" ;;
    quantized)
        timeout 120 python3 -m service.bench_quantized --device cuda --out "$OUT" 2>&1 | tail -20
        rc=${PIPESTATUS[0]} ;;
    serving)
        timeout 120 python3 -m load_tests.bench_serving --device cuda --out "$OUT/serving_tiny" 2>&1 \
            | grep -v "Loading weights" | tee "$OUT/serving_tiny.log"
        rc=${PIPESTATUS[0]}
        wide_model
        timeout 240 python3 -m load_tests.bench_serving --device cuda --dtype bfloat16 --model /tmp/wide-moe \
            --served-model-name wide-moe --out "$OUT/serving_wide" 2>&1 | grep -v "Loading weights" \
            | tee "$OUT/serving_wide.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    profile)
        wide_model
        timeout 180 python3 scripts/profile_engine.py --device cuda --dtype bfloat16 --model /tmp/wide-moe \
            --streams 1 32 --out "$OUT/profile" 2>&1 | grep "streams="
        rc=${PIPESTATUS[0]} ;;
    *) echo "unknown stage $stage"; rc=2 ;;
    esac
    [ "$rc" = 0 ] || failed="$failed $stage"
done
if [ -n "$failed" ]; then
    echo "failed:$failed"
    exit 1
fi
