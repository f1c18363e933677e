#!/usr/bin/env bash
# Runs on the GPU machine (the device tool), over device-pack/ made by benches/device/pack.sh:
#
#   benches/device/session.sh STAGE...       (from the repository root; logs and JSON to $OUT)
#
# Stages, each well under the tool's 10-minute limit, so a session can run them one call each:
#   env       what the machine has (nvidia-smi, nvcc, NVRTC/cuBLAS libraries), `doctor`
#   tests     the GPU tests (tests/cuda_ops.rs, tests/mixed_precision.rs, tests/doctor.rs) for real
#   sanitize  compute-sanitizer racecheck over attention, memcheck over the GPU tests
#             (SANITIZE="test ..." runs those cuda_ops tests only)
#   bench     `bertft-cuda bench` and benches/hf_reference.py at BERT-base seq 128, batch 32/64,
#             fp16/bf16 (and ours in fp32), side by side
#   kernels   benches/gpu_kernels.rs (criterion, CUDA events): every kernel family's GB/s or
#             TFLOP/s beside the copy and GEMM ceilings measured in the same run; then PyTorch
#             SDPA at the attention group's shapes (benches/sdpa_reference.py)
#   sst2      `train --fp16` MiniLM on SST-2 for one epoch, then the Hugging Face Trainer on the
#             same settings (benches/hf_reference.py --sst2-dir), accuracy and wall clock
# The numbers go to benches/RESULTS.md by hand, with the date, the commit (device-pack/commit),
# the command and the baseline measured in the same call.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
pack="$root/device-pack"
OUT="${OUT:-$root/device-out}"
mkdir -p "$OUT"
[ -d "$pack" ] || { echo "no device-pack/: run benches/device/pack.sh and carry device-pack" >&2; exit 2; }
# One folder per packed commit: a warm machine never runs an earlier pack's executables.
work="/tmp/bertft-$(head -c 12 "$pack/commit")"

unpack() {
    mkdir -p "$work"
    for f in "$pack"/bin/*.xz "$pack"/tests/*.xz "$pack"/benches/*.xz; do
        [ -f "$f" ] || continue
        local dest="$work/$(basename "$(dirname "$f")")/$(basename "$f" .xz)"
        mkdir -p "$(dirname "$dest")"
        [ -x "$dest" ] || { xz -dc "$f" > "$dest" && chmod +x "$dest"; }
    done
    # The test executables look for fixtures, kernels/ and the binary under the folder they
    # were built in: make that path reach this copy of the tree.
    local built; built=$(cat "$pack/manifest_dir")
    if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
    fi
    mkdir -p "$root/target/release"
    cp "$work/bin/bertft-cuda" "$root/target/release/"
    # The CUDA toolkit of the machine (NVRTC, cuBLAS, headers).
    if [ -z "${CUDA_HOME:-}" ]; then
        local nvcc; nvcc=$(command -v nvcc || true)
        if [ -n "$nvcc" ]; then export CUDA_HOME; CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")"); fi
    fi
    export BERTFT_CACHE="$work/kernel-cache"
    export BERTFT_MINILM_DIR="$pack/minilm-fp16"
    export BERTFT_SST2_DIR="$pack/sst2"
}

run_logged() { # run_logged NAME CMD...: output to $OUT/NAME.log and the terminal, status kept
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/summary.log"
    local start=$SECONDS status=0
    "$@" > "$OUT/$name.log" 2>&1 || status=$?
    echo "   exit $status in $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
    tail -n 5 "$OUT/$name.log"
    return 0
}

stage_env() {
    run_logged nvidia-smi nvidia-smi
    run_logged toolkit bash -c 'which nvcc; nvcc --version; ldconfig -p | grep -E "nvrtc|cublas|libcuda\.so"; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"; echo CUDA_HOME=$CUDA_HOME'
    run_logged doctor "$work/bin/bertft-cuda" doctor
}

stage_tests() {
    # cuda_ops is the GPU's; of doctor only the test that reads the GPU (the others compile every
    # kernel with NVRTC, as CI does without a GPU). mixed_precision is CPU-only: CI runs it.
    [ -x "$work/tests/cuda_ops" ] && run_logged test-cuda_ops "$work/tests/cuda_ops" --test-threads 1
    [ -x "$work/tests/doctor" ] && run_logged test-doctor "$work/tests/doctor" \
        --exact doctor_without_arch_uses_the_gpu_or_asks_for_arch --test-threads 1
    grep -h "test result\|FAILED\|panicked\|skipped" "$OUT"/test-*.log | tee -a "$OUT/summary.log" || true
}

stage_sanitize() {
    # SANITIZE="name ..." picks cuda_ops tests (the whole list may not fit one 10-minute call):
    # the attention kernels first, racecheck (shared memory) then memcheck, then every other op.
    local cs; cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    local t
    for t in ${SANITIZE:-attention attention_tensor_cores attention_reads_stored_qkv attention_stores_its_output}; do
        case "$t" in attention*) run_logged "racecheck-$t" "$cs" --tool racecheck --error-exitcode 9 \
            "$work/tests/cuda_ops" --exact "$t" --test-threads 1 ;; esac
    done
    for t in ${SANITIZE:-attention attention_tensor_cores attention_reads_stored_qkv attention_stores_its_output linear \
             linear_reduced_precision linear_forward_bias_epilogue_and_fallback \
             matmul_format_storage refresh_weight_copies embeddings layernorm \
             activations dropout first_tokens cross_entropy cross_entropy_forward_backward \
             sum_squares_and_clipping loss_scaling adamw_update model_forward_backward}; do
        run_logged "memcheck-$t" "$cs" --tool memcheck --error-exitcode 9 "$work/tests/cuda_ops" --exact "$t" --test-threads 1
    done
}

stage_bench() {
    local b="$work/bin/bertft-cuda"
    for p in fp16 bf16; do
        run_logged "ours-$p" "$b" bench --device cuda --config bert-base-uncased --batch-size 32,64 \
            --seq-len 128 --steps 30 --warmup-steps 5 --"$p" --json "$OUT/ours-$p.json"
    done
    run_logged ours-fp32 "$b" bench --device cuda --config bert-base-uncased --batch-size 32 \
        --seq-len 128 --steps 10 --warmup-steps 3 --json "$OUT/ours-fp32.json"
    # The same fp16 step with the bias GEMMs instead of cuBLASLt's bias epilogue: what it buys.
    BERTFT_CUBLASLT=0 run_logged ours-fp16-no-cublaslt "$b" bench --device cuda --config bert-base-uncased \
        --batch-size 32 --seq-len 128 --steps 30 --warmup-steps 5 --fp16 --json "$OUT/ours-fp16-no-cublaslt.json"
    # Each step as a CUDA graph: what the launches cost (BERT-base and MiniLM's small kernels).
    run_logged ours-fp16-graphs "$b" bench --device cuda --config bert-base-uncased --batch-size 32,64 \
        --seq-len 128 --steps 30 --warmup-steps 5 --fp16 --cuda-graphs --json "$OUT/ours-fp16-graphs.json"
    for g in "" --cuda-graphs; do
        run_logged "ours-minilm-fp16${g:+-graphs}" "$b" bench --device cuda --model "$pack/minilm-fp16" \
            --batch-size 32 --seq-len 64 --steps 50 --warmup-steps 5 --fp16 $g \
            --json "$OUT/ours-minilm-fp16${g:+-graphs}.json"
    done
    run_logged theirs python3 benches/hf_reference.py --batch-sizes 32,64 --seq-len 128 --steps 30 \
        --json "$OUT/theirs.json"
}

stage_kernels() {
    [ -x "$work/benches/gpu_kernels" ] || { echo "gpu_kernels was not packed" >&2; return 0; }
    # Criterion's reports go under the working directory's target/criterion.
    run_logged gpu-kernels "$work/benches/gpu_kernels" --bench --noplot
    # PyTorch SDPA at the attention group's shapes, the same ids under sdpa/ (the baseline).
    run_logged sdpa python3 benches/sdpa_reference.py
}

stage_sst2() {
    local b="$work/bin/bertft-cuda"
    run_logged sst2-ours "$b" train --device cuda --fp16 --model "$pack/minilm-fp16" \
        --train-file "$pack/sst2/train.tsv" --validation-file "$pack/sst2/dev.tsv" \
        --output-dir "$work/sst2-ours" --overwrite-output-dir --num-train-epochs 1 \
        --per-device-train-batch-size 32 --per-device-eval-batch-size 64 --learning-rate 1e-4 \
        --warmup-steps 0.06 --weight-decay 0.01 --eval-strategy epoch --save-strategy no \
        --logging-steps 200 --seed 42
    # The same run with each step as a CUDA graph (dynamic padding: one graph per batch length).
    run_logged sst2-ours-graphs "$b" train --device cuda --fp16 --cuda-graphs --model "$pack/minilm-fp16" \
        --train-file "$pack/sst2/train.tsv" --validation-file "$pack/sst2/dev.tsv" \
        --output-dir "$work/sst2-ours-graphs" --overwrite-output-dir --num-train-epochs 1 \
        --per-device-train-batch-size 32 --per-device-eval-batch-size 64 --learning-rate 1e-4 \
        --warmup-steps 0.06 --weight-decay 0.01 --eval-strategy epoch --save-strategy no \
        --logging-steps 200 --seed 42
    run_logged sst2-theirs python3 benches/hf_reference.py --fp16 --sst2-dir "$pack/sst2" \
        --minilm-dir "$pack/minilm-fp16" --tokenizer-dir "$pack/minilm-fp16" --json "$OUT/sst2-theirs.json"
}

unpack
[ $# -gt 0 ] || set -- env tests
for stage in "$@"; do
    case "$stage" in
        env|tests|sanitize|bench|kernels|sst2) "stage_$stage" ;;
        *) echo "unknown stage $stage (env, tests, sanitize, bench, kernels, sst2)" >&2; exit 2 ;;
    esac
done
