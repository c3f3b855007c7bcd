"""Attention backends on this GPU: forward+backward time at the training shape and agreement.

For each backend of parlm.model.attention (fa3, fa4, cudnn, flash, efficient, math) that runs here,
and for the SDPA ones in both GQA modes (k/v with 4 heads passed natively, or repeated to 8),
times causal attention at B=48, T=2048, 8 query / 4 KV heads, head_dim 64, bf16 (one
micro-batch of the reference's training step), forward alone and forward+backward, and
checks the output and the gradients against an fp32 softmax reference on the first two
sequences. Prints one JSON line per case and a summary; `auto` is what select_backend picks.

    python benchmarks/attention_backends.py [--batch 48 --seq 2048 --iters 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parlm.model import attention as attention  # noqa: E402


def timed(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` runs after `warmup` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_agreement(backend: str, q, k, v, grad_out) -> dict:
    """Max abs error of output and q/k/v gradients vs the fp32 softmax reference (2 sequences),
    relative to the reference's largest magnitude."""
    small = [t[:2].detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention.causal_attention(*small, backend, strict=True)
    out.backward(grad_out[:2])
    got = [out.detach().float()] + [t.grad.float() for t in small]
    ref_inputs = [t[:2].detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention.reference_attention(*ref_inputs)
    ref.backward(grad_out[:2].float())
    want = [ref.detach()] + [t.grad for t in ref_inputs]
    names = ("out", "dq", "dk", "dv")
    return {f"rel_err_{n}": round(((a - b).abs().max() / b.abs().max()).item(), 5)
            for n, a, b in zip(names, got, want)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", default="fa3,fa4,cudnn,flash,efficient,math")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "device": torch.cuda.get_device_name(device)}
    print(json.dumps(env))
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    q, k, v = (torch.randn(s, generator=generator).to(device, torch.bfloat16).requires_grad_()
               for s in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, generator=generator).to(device, torch.bfloat16)
    causal_flops = 4 * args.batch * args.heads * args.seq ** 2 * args.head_dim / 2  # QK^T and PV, half masked

    results = []
    for backend in [b for b in args.backends.split(",") if b]:
        reason = attention.backend_unavailable_reason(backend, device)
        if reason is not None:
            results.append({"backend": backend, "available": False, "reason": reason})
            print(json.dumps(results[-1]))
            continue
        modes = [True, False] if backend not in ("fa3",) and attention.native_gqa(backend) else [attention.native_gqa(backend)]
        for native in modes:
            if backend != "fa3":
                attention._NATIVE_GQA[backend] = native
            try:
                def forward():
                    return attention.causal_attention(q, k, v, backend, strict=True)

                def forward_backward():
                    out = attention.causal_attention(q, k, v, backend, strict=True)
                    out.backward(grad_out)

                fwd_ms = timed(lambda: forward(), args.iters, args.warmup)
                fwd_bwd_ms = timed(forward_backward, args.iters, args.warmup)
                record = {"backend": backend, "available": True, "native_gqa": native,
                          "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_bwd_ms, 3),
                          "fwd_tflops": round(causal_flops / fwd_ms / 1e9, 1),
                          "fwd_bwd_tflops": round(3.5 * causal_flops / fwd_bwd_ms / 1e9, 1)}
                record.update(check_agreement(backend, q, k, v, grad_out))
            except Exception as exc:  # noqa: BLE001 - report and continue with the next case
                record = {"backend": backend, "available": True, "native_gqa": native,
                          "error": f"{type(exc).__name__}: {exc}"[:300]}
            q.grad = k.grad = v.grad = None
            results.append(record)
            print(json.dumps(record))
        if backend != "fa3":
            attention._NATIVE_GQA[backend] = modes[0]
        if backend == "fa4":
            attention._activate_fa4(False)

    timed_ok = [r for r in results if "fwd_bwd_ms" in r]
    attention._unavailable_reason_cached.cache_clear()
    summary = {"auto": attention.select_backend("auto", device),
               "fastest": min(timed_ok, key=lambda r: r["fwd_bwd_ms"]) if timed_ok else None,
               "shape": {"batch": args.batch, "seq": args.seq, "heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim}, "env": env, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({"summary": summary}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    # bf16 inputs and outputs: errors of a few 1e-3 of the largest value are rounding.
    bad = [r for r in timed_ok if max(r[f"rel_err_{n}"] for n in ("out", "dq", "dk", "dv")) > 2e-2]
    if bad:
        print(f"DISAGREEMENT: {[(r['backend'], r['native_gqa']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
