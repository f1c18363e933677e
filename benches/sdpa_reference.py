#!/usr/bin/env python3
"""The PyTorch side of benches/gpu_kernels.rs's `attention` group: torch's
scaled_dot_product_attention (SDPA, what transformers' BERT runs with attn_implementation='sdpa')
forward and backward at the same shapes, so one run prints both as `summary:` lines with the
same ids (`sdpa/...` for `attention/...`) and the same FLOP count.

Shapes (as gpu_kernels.rs): BERT-base (12 heads of 64) and MiniLM (12 heads of 32); sequence 128
and 512, every position a real token, 4096 rows (batch = 4096 / sequence); dropout 0.1 (training);
fp32, fp16 and bf16 inputs. q, k and v are views of one packed [batch, seq, 3, heads, head_dim]
tensor, transposed to [batch, heads, seq, head_dim] as transformers passes them. The forward is
timed alone, with autograd on as in training; the backward is torch.autograd.grad of the forward's output with respect to q, k
and v, the forward done before the timed region.

FLOPs (FlashAttention's count, as gpu_kernels.rs): forward 4*rows*seq*hidden, backward 2.5x that.
Times are the median of --runs CUDA-event-timed calls after --warmup calls.

GPU machine (benches/device/session.sh kernels runs it after gpu_kernels):
    python3 benches/sdpa_reference.py
CPU smoke test (wall clock, smaller shapes):
    /work/venv/bin/python benches/sdpa_reference.py --device cpu --rows 256 --runs 2 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

MODELS = [("bert", 12, 64), ("minilm", 12, 32)]
SEQS = [128, 512]
DROPOUT = 0.1
PRECISIONS = [("", torch.float32), ("_fp16", torch.float16), ("_bf16", torch.bfloat16)]


def fmt_time(secs: float) -> str:
    """As gpu_kernels.rs's fmt_time."""
    return f"{secs * 1e6:.1f} µs" if secs < 1e-3 else f"{secs * 1e3:.3f} ms"


def timed(fn, device: str, warmup: int, runs: int) -> float:
    """Median seconds of one call of `fn` over `runs` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cases(rows: int):
    for suffix, dtype in PRECISIONS:
        for name, heads, head_dim in MODELS:
            for seq in SEQS:
                if rows % seq:
                    continue
                yield suffix, dtype, name, heads, head_dim, rows // seq, seq


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=4096, help="batch x sequence (gpu_kernels.rs: 4096)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    dev = args.device
    if dev == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for suffix, dtype, name, heads, head_dim, batch, seq in cases(args.rows):
        rows, hidden = batch * seq, heads * head_dim
        param = f"{name}_b{batch}_s{seq}_h{heads}_d{head_dim}"
        qkv = torch.randn(batch, seq, 3, heads, head_dim, device=dev, dtype=dtype, requires_grad=True)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        forward = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT)  # noqa: E731
        fwd_flops = 4 * rows * seq * hidden
        # With autograd on, as in training (the forward keeps what its backward needs).
        report(f"sdpa/fwd{suffix}/{param}", timed(forward, dev, args.warmup, args.runs), fwd_flops)
        out = forward()
        dout = torch.randn_like(out)
        backward = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        secs = timed(backward, dev, args.warmup, args.runs)
        report(f"sdpa/bwd{suffix}/{param}", secs, fwd_flops * 5 // 2)
        del qkv, q, k, v, out, dout
        if dev == "cuda":
            torch.cuda.empty_cache()


def report(id: str, secs: float, flops: int) -> None:
    print(f"summary: {id:<58} {fmt_time(secs):>11}  {flops / secs / 1e12:.2f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
