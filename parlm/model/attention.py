"""Causal grouped-query attention with interchangeable kernels (SPEC 2.2, step 5).

Every backend computes the same function

    y[b, t, h] = sum_{s <= t} softmax_s(q[b,t,h] . k[b,s,g(h)] / sqrt(D)) v[b,s,g(h)],
    g(h) = h // (H / H_kv)

on the layout the model produces without copies: q [B, T, H, D], k and v [B, T, H_kv, D],
output [B, T, H, D] (the FlashAttention layout; SDPA receives transposed views, which its
kernels read in place).

Backends, in the order `auto` tries them on CUDA:
- ``fa3``: FlashAttention-3 (`flash_attn_interface.flash_attn_func`), the reference's kernel;
- ``fa4``: a FlashAttention-4 package (`flash_attn.cute`) installed into SDPA's flash slot
  through `torch.nn.attention.activate_flash_attention_impl("FA4")`;
- ``cudnn``, ``flash``, ``efficient``: PyTorch SDPA restricted to that kernel;
- ``math``: SDPA's explicit math kernel (the CPU choice).
Each CUDA candidate is probed once (forward and backward on a small GQA problem, checked
against an fp32 softmax reference) before `auto` picks it, so a kernel that is missing or
wrong on the machine is skipped instead of failing mid-run. GQA is passed natively
(`enable_gqa=True`) where the kernel accepts it, else K/V heads are repeated.
"""
from __future__ import annotations

import functools
import importlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from parlm.config import ConfigError

# `auto` preference on CUDA: fastest first (FA3 is what the reference ran; cuDNN's Hopper
# kernels beat SDPA's FlashAttention-2 on H100; `benchmarks/attention_backends.py` measures).
AUTO_ORDER_CUDA = ("fa3", "fa4", "cudnn", "flash", "efficient")
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "fa4": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Eager calls may fall back, in this order, when the chosen kernel rejects a shape (cuDNN
# refuses a key/value length of 1, e.g. the audit's first window); compiled graphs, whose
# shapes the backend probe and warm-up checked, keep the chosen kernel alone.
_FALLBACK_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
KNOWN_BACKENDS = ("fa3", "fa4", "cudnn", "flash", "efficient", "math", "sdpa")

# Per SDPA backend: does it take k/v with fewer heads (enable_gqa=True)? Filled by the probe;
# the defaults are what recent PyTorch accepts. `sdpa` lets PyTorch choose the kernel.
_NATIVE_GQA = {"cudnn": True, "flash": True, "fa4": True, "efficient": False, "math": True, "sdpa": True}


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, H_kv, D] -> [B, T, H_kv*groups, D] with head h reading KV head h // groups."""
    if groups == 1:
        return x
    batch, seq, kv_heads, dim = x.shape
    return x[:, :, :, None, :].expand(batch, seq, kv_heads, groups, dim).reshape(batch, seq, kv_heads * groups, dim)


# flash_attn_interface.flash_attn_func once imported (a plain global, so torch.compile traces
# straight into it, as the reference's fullgraph compile does).
_fa3_flash_attn_func = None


def _load_fa3():
    global _fa3_flash_attn_func
    if _fa3_flash_attn_func is None:
        _fa3_flash_attn_func = importlib.import_module("flash_attn_interface").flash_attn_func
    return _fa3_flash_attn_func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     strict: bool = False) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with GQA; q [B,T,H,D], k/v [B,T,H_kv,D] -> [B,T,H,D].

    SDPA backends run with the chosen kernel first; outside torch.compile a shape that kernel
    rejects falls back to flash, efficient, then math (same function, another kernel), unless
    `strict` (the probe and the benchmarks: the chosen kernel or an error)."""
    if backend == "fa3":
        if _fa3_flash_attn_func is None:
            raise RuntimeError("FlashAttention-3 is not loaded; select the backend with select_backend('fa3', device)")
        out = _fa3_flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    groups = q.size(2) // k.size(2)
    native = _NATIVE_GQA.get(backend, False)
    if not native:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = native and groups > 1
    if backend == "sdpa":
        y = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, enable_gqa=gqa)
    elif strict or torch.compiler.is_compiling():
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            y = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, enable_gqa=gqa)
    else:
        chosen = SDPA_BACKENDS[backend]
        order = [chosen] + [b for b in _FALLBACK_ORDER if b != chosen]
        with sdpa_kernel(order, set_priority=True):
            y = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Slow explicit fp32 softmax(q k^T/sqrt(D) + causal mask) v with GQA (tests and probes)."""
    groups = q.size(2) // k.size(2)
    qf = q.float().transpose(1, 2)
    kf = repeat_kv(k.float(), groups).transpose(1, 2)
    vf = repeat_kv(v.float(), groups).transpose(1, 2)
    seq = q.size(1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.size(-1))
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2)


# ----------------------------------------------------------------------------------------
# Backend selection
def _fa4_available() -> str | None:
    """None when FA4 can be installed into SDPA, else the reason it cannot."""
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
        return f"flash_attn.cute is not importable ({type(exc).__name__}: {exc})"
    attention_api = torch.nn.attention
    if not hasattr(attention_api, "activate_flash_attention_impl") or \
            "FA4" not in attention_api.list_flash_attention_impls():
        return f"torch {torch.__version__} has no FA4 slot for SDPA"
    return None


def _activate_fa4(active: bool) -> None:
    attention_api = torch.nn.attention
    if active:
        attention_api.activate_flash_attention_impl("FA4")
    elif hasattr(attention_api, "current_flash_attention_impl") and \
            attention_api.current_flash_attention_impl() == "FA4":
        attention_api.restore_flash_attention_impl()


def _probe(backend: str, device: torch.device) -> str | None:
    """Run `backend` forward+backward on a small causal GQA problem; None when the output and
    the q/k/v gradients agree with `reference_attention` (relative to their largest value),
    else the reason they do not."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((2, 128, 8, 64), (2, 128, 4, 64), (2, 128, 4, 64), (2, 128, 8, 64))
    q, k, v, grad_out = (torch.randn(s, generator=generator).to(device, torch.bfloat16) for s in shapes)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    try:
        y = causal_attention(*inputs, backend, strict=True)
        y.backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - the probe reports any failure as "unavailable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    reference_inputs = [t.float().requires_grad_() for t in (q, k, v)]
    reference = reference_attention(*reference_inputs)
    reference.backward(grad_out.float())
    pairs = [(y, reference)] + [(a.grad, b.grad) for a, b in zip(inputs, reference_inputs)]
    for name, (got, want) in zip(("output", "dq", "dk", "dv"), pairs):
        if got is None:
            return f"no gradient for {name}"
        error = ((got.float() - want).abs().max() / want.abs().max()).item()
        if not math.isfinite(error) or error > 2e-2:
            return f"{name} disagrees with the softmax reference (relative error {error:.3g})"
    return None


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None when `backend` runs correctly on `device` (probing once), else the reason."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _unavailable_reason_cached(backend, str(device))


@functools.lru_cache(maxsize=None)
def _unavailable_reason_cached(backend: str, device_name: str) -> str | None:
    device = torch.device(device_name)
    if backend not in KNOWN_BACKENDS:
        return f"unknown attention backend {backend!r}; known: {KNOWN_BACKENDS}"
    if device.type != "cuda":
        return None if backend in ("math", "sdpa") else f"{backend} needs a CUDA device"
    if backend == "fa3":
        try:
            _load_fa3()
        except Exception as exc:  # noqa: BLE001
            return f"flash_attn_interface is not importable ({type(exc).__name__}: {exc})"
        return _probe("fa3", device)
    if backend == "fa4":
        reason = _fa4_available()
        if reason:
            return reason
        _activate_fa4(True)
        reason = _probe("fa4", device)
        if reason:
            _activate_fa4(False)
        return reason
    if _NATIVE_GQA.get(backend):
        if _probe(backend, device) is None:
            return None
        _NATIVE_GQA[backend] = False  # retry with repeated K/V heads
    return _probe(backend, device)


def native_gqa(backend: str) -> bool:
    """Whether `backend` receives k/v with H_kv heads (True) or repeated to H heads (False)."""
    return backend == "fa3" or _NATIVE_GQA.get(backend, False)


def select_backend(name: str, device: torch.device | str) -> str:
    """The attention backend to use on `device` for the configured `name`.

    `auto`: on CPU ``math``; on CUDA the first of AUTO_ORDER_CUDA that imports, runs and
    agrees with the softmax reference. An explicit name is checked the same way and raises
    ConfigError saying why it cannot run. Selecting ``fa4`` installs FA4 into SDPA's flash slot.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "math"
        reasons = {}
        for candidate in AUTO_ORDER_CUDA:
            reason = backend_unavailable_reason(candidate, device)
            if reason is None:
                if candidate == "fa4":
                    _activate_fa4(True)
                return candidate
            reasons[candidate] = reason
        raise RuntimeError(f"no attention backend runs on {device}: {reasons}")
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        hint = "use attention_backend=auto" + (" or math" if device.type != "cuda" else "")
        raise ConfigError(f"attention_backend={name} cannot run on {device}: {reason}; {hint}")
    if name == "fa4":
        _activate_fa4(True)
    return name
