#!/usr/bin/env bash
# Packs what a GPU session needs into device-pack/ (git-ignored through .git/info/exclude), for
# the device tool's `carry` (64 MiB at most): the GPU machine has the CUDA toolkit, PyTorch and
# transformers but no cargo and no network, so everything Rust is built here.
#
#   benches/device/pack.sh            # then: carry ["device-pack"], run benches/device/session.sh
#
# device-pack/
#   bin/bertft-cuda.xz                    the release binary, stripped, xz
#   tests/<name>.xz                       the GPU-relevant test executables (cuda_ops, doctor,
#                                         mixed_precision), stripped, xz
#   benches/<name>.xz                     criterion bench executables that exist (gpu_kernels)
#   minilm-fp16/                          all-MiniLM-L6-v2 with fp16 weights (45 MB instead of
#                                         87 MB; our loader widens them to fp32) + tokenizer
#   sst2/                                 SST-2 train and dev (3.9 MB; BERTFT_SST2_DIR, default
#                                         ../shared/data/sst2)
#   manifest_dir                          the path the executables were built in (their tests
#                                         find fixtures and the binary under it: session.sh
#                                         links it to the device's copy of the tree)
#   commit                                the commit packed
# Needs: cargo, strip, xz, a python3 with numpy and safetensors (or torch) for the conversion
# (PYTHON, default python3), and the MiniLM folder (BERTFT_MINILM_DIR, default the one
# tests/run.sh fetches).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
# The executables' built-in paths (the binary the CLI tests run) must fall under the tree that
# session.sh links on the device.
export CARGO_TARGET_DIR="$root/target"
out="$root/device-pack"
python="${PYTHON:-python3}"
minilm="${BERTFT_MINILM_DIR:-$root/target/test-assets/all-minilm-l6-v2}"

exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/device-pack/' "$exclude" 2>/dev/null || {
    mkdir -p "$(dirname "$exclude")" && echo '/device-pack/' >> "$exclude"
}
rm -rf "$out" && mkdir -p "$out/bin" "$out/tests" "$out/benches"
git rev-parse HEAD > "$out/commit"
git diff --quiet || echo "dirty" >> "$out/commit"

cargo build --release
pack() { # pack SRC DEST: stripped and compressed
    cp "$1" "$out/$2" && strip "$out/$2" && xz -9 -T0 "$out/$2"
}
pack target/release/bertft-cuda bin/bertft-cuda

# Test and bench executables, found through cargo's JSON messages (names carry hashes).
executables() { # executables CARGO-ARGS...: "name path" per line
    cargo "$@" --no-run --message-format=json | "$python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message" and m["message"].get("level") == "error":
        sys.stderr.write(m["message"].get("rendered", ""))
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["test"], ["bench"]):
        print(m["target"]["name"], m["executable"])'
}
executables test --release --tests | while read -r name path; do
    case "$name" in cuda_ops|doctor|mixed_precision) pack "$path" "tests/$name" ;; esac
done
executables bench --benches | while read -r name path; do
    case "$name" in gpu_kernels) pack "$path" "benches/$name" ;; esac
done

if [ -f "$minilm/model.safetensors" ]; then
    mkdir -p "$out/minilm-fp16"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
        [ -f "$minilm/$f" ] && cp "$minilm/$f" "$out/minilm-fp16/"
    done
    "$python" - "$minilm/model.safetensors" "$out/minilm-fp16/model.safetensors" <<'PY'
import sys
try:
    from safetensors.numpy import load_file, save_file
    import numpy as np
    t = load_file(sys.argv[1])
    save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in t.items()}, sys.argv[2])
except ImportError:
    from safetensors.torch import load_file, save_file
    import torch
    t = load_file(sys.argv[1])
    save_file({k: (v.half() if v.dtype == torch.float32 else v) for k, v in t.items()}, sys.argv[2])
PY
else
    echo "no MiniLM at $minilm (run tests/run.sh once, or set BERTFT_MINILM_DIR): packed without it" >&2
fi
sst2="${BERTFT_SST2_DIR:-$root/../shared/data/sst2}"
if [ -f "$sst2/train.tsv" ]; then
    mkdir -p "$out/sst2" && cp "$sst2/train.tsv" "$sst2/dev.tsv" "$out/sst2/"
else
    echo "no SST-2 at $sst2: packed without it" >&2
fi
echo "$root" > "$out/manifest_dir"
du -sh "$out"
total=$(du -sb "$out" | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "device-pack is $total bytes, over the 64 MiB carry limit" >&2
    exit 1
fi
