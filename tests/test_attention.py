"""parlm.model.attention: every backend on this machine equals an explicit softmax attention."""
from __future__ import annotations

import math

import pytest
import torch

from parlm.model.attention import (AUTO_ORDER_CUDA, backend_unavailable_reason, causal_attention, repeat_kv,
                             select_backend)
from parlm.config import ConfigError


def slow_attention(q, k, v):
    """Loops over batch, heads and positions: softmax(q.k/sqrt(D) over s <= t) weighted v."""
    batch, seq, heads, dim = q.shape
    groups = heads // k.size(2)
    out = torch.zeros(batch, seq, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // groups
            for t in range(seq):
                scores = torch.stack([q[b, t, h].double() @ k[b, s, g].double() for s in range(t + 1)]) / math.sqrt(dim)
                weights = torch.softmax(scores, dim=0)
                out[b, t, h] = sum(weights[s] * v[b, s, g].double() for s in range(t + 1))
    return out


def random_qkv(shape_q=(2, 7, 4, 8), kv_heads=2, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, seq, heads, dim = shape_q
    q = torch.randn(batch, seq, heads, dim, generator=generator)
    k = torch.randn(batch, seq, kv_heads, dim, generator=generator)
    v = torch.randn(batch, seq, kv_heads, dim, generator=generator)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def test_repeat_kv_maps_head_to_group():
    k = torch.arange(3 * 2, dtype=torch.float32).reshape(1, 1, 3, 2)
    repeated = repeat_kv(k, 2)
    assert [repeated[0, 0, h, 0].item() for h in range(6)] == [k[0, 0, h // 2, 0].item() for h in range(6)]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_cpu_backends_match_slow_softmax(backend):
    q, k, v = random_qkv()
    expected = slow_attention(q, k, v)
    out = causal_attention(q, k, v, backend)
    assert out.shape == q.shape
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 7])
def test_a_kernel_that_rejects_the_shape_falls_back_in_eager_mode_only(length):
    """cuDNN is unavailable on CPU, as it is on CUDA for a key/value length of 1: eager calls
    fall back to another kernel with the same result; strict calls (the probe) raise."""
    q, k, v = random_qkv(shape_q=(1, length, 4, 8), seed=4)
    out = causal_attention(q, k, v, "cudnn")
    assert torch.allclose(out.double(), slow_attention(q, k, v), atol=1e-5)
    with pytest.raises(RuntimeError):
        causal_attention(q, k, v, "cudnn", strict=True)


def test_cpu_gradients_match_slow_softmax():
    q, k, v = (t.double().requires_grad_() for t in random_qkv(shape_q=(1, 5, 4, 4), seed=1))
    weights = torch.randn(1, 5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (causal_attention(q, k, v, "math") * weights).sum().backward()
    fast = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (slow_attention(q, k, v) * weights).sum().backward()
    for got, want in zip(fast, (q.grad, k.grad, v.grad)):
        assert torch.allclose(got, want, atol=1e-9)


def test_select_backend_on_cpu():
    assert select_backend("auto", "cpu") == "math"
    assert select_backend("math", "cpu") == "math"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        select_backend("flash", "cpu")
    assert backend_unavailable_reason("nonsense", "cpu").startswith("unknown attention backend")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree_with_reference():
    q, k, v = random_qkv(shape_q=(2, 256, 8, 64), kv_heads=4, dtype=torch.bfloat16, device="cuda", seed=3)
    from parlm.model.attention import reference_attention
    expected = reference_attention(q, k, v)
    available = [b for b in AUTO_ORDER_CUDA if backend_unavailable_reason(b, "cuda") is None]
    assert available, "no CUDA attention backend runs"
    for backend in available + ["math"]:
        out = causal_attention(q, k, v, backend)
        assert (out.float() - expected).abs().max().item() < 2e-2, backend
    assert select_backend("auto", "cuda") == available[0]


def test_probe_rejects_a_wrong_kernel(monkeypatch):
    """A kernel that ignores the causal mask must be reported, not selected."""
    import parlm.model.attention as attention_module

    def not_causal(q, k, v, backend, strict=False):
        k, v = repeat_kv(k, q.size(2) // k.size(2)), repeat_kv(v, q.size(2) // k.size(2))
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
        return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)

    monkeypatch.setattr(attention_module, "causal_attention", not_causal)
    reason = attention_module._probe("math", torch.device("cpu"))
    assert reason is not None and "disagrees" in reason
