#!/usr/bin/env bash
# Pack, on this machine, the Python packages the GPU tests need that a lent GPU machine's image lacks (it has
# torch, numpy, aiohttp, grpcio, ... for Python 3.12 but not Ray, FastAPI, openai, nor this project's
# transformers), as one archive to carry there (`.gpu_site/site312.tar.xz`, git-ignored; scripts/gpu_check.sh
# unpacks it). The versions are this venv's. Ray's wheel (79 MB) is cut to what a local cluster and Serve use
# (no Java jars, RLlib, Train, Tune, Data, LLM, dashboard source maps; its binaries stripped) so the archive
# and the working tree fit the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Missing from the image (KINDS.md's package list), or there in another version than this venv's; the versions are
# this venv's but grpcio-reflection's, whose generated code refuses a grpcio older than itself: the image's grpcio.
IMAGE_GRPCIO=${IMAGE_GRPCIO:-1.84.0}  # (the H200 image's, 2026-11-29)
names="ray aiohttp-cors annotated-types cffi colorful distlib fastapi google-api-core google-auth
googleapis-common-protos httpcore2 httptools httpx2 jiter jsonschema jsonschema-specifications
llguidance loguru mmh3 openai opencensus opencensus-context opentelemetry-api opentelemetry-exporter-prometheus
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions platformdirs proto-plus pyasn1
pyasn1_modules pycparser pydantic pydantic_core python-discovery python-dotenv referencing rpds-py smart_open
sniffio starlette truststore typing-inspection tzdata uvicorn watchfiles websockets transformers huggingface_hub
compressed-tensors promql-parser"
pins=("grpcio-reflection==$IMAGE_GRPCIO")
for name in $names; do
    pins+=("$("$PY" -m pip show "$name" 2>/dev/null | awk -v n="$name" '/^Version:/ {print n "==" $2}')")
done
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$work/wheels" "${pins[@]}"
mkdir -p "$work/site312"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site312"; done
cd "$work/site312"
rm -rf ray/jars ray/rllib ray/train ray/tune ray/data ray/llm ray/dashboard/client/build/static/js/*.map
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
cd - >/dev/null
mkdir -p .gpu_site
tar cf - -C "$work" site312 | xz -T0 -6 > .gpu_site/site312.tar.xz
ls -l .gpu_site/site312.tar.xz
