"""The void-fraction diagnostic (SPEC 6.5) on a hand-worked state dict."""
from __future__ import annotations

import pytest
import torch

from parlm.ppm.diagnostics import void_fraction


def test_void_fraction_hand_worked():
    half = torch.cat([torch.ones(1000), 3 * torch.ones(1000)])  # mean |w| = 2: 1000 of 2000 at or below
    state = {
        "blocks.0.attn.weight": half.view(40, 50),
        "skip_weights": torch.cat([torch.zeros(1500), torch.ones(500)]),  # mean 0.25: 1500 of 2000
        "blocks.0.norm.weight": torch.zeros(1000),  # not more than 1000 entries: ignored
        "blocks.0.attn.bias": torch.zeros(5000),  # no "weight" in the name: ignored
        "tok_emb.weight_ids": torch.zeros(3000, dtype=torch.int64),  # not floating: ignored
    }
    assert void_fraction(state) == pytest.approx((1000 + 1500) / 4000)


def test_void_fraction_bf16_matches_reference_rule():
    torch.manual_seed(0)
    weight = torch.randn(64, 64).to(torch.bfloat16)
    threshold = weight.abs().mean()
    expect = float((weight.abs() <= threshold).float().sum()) / weight.numel()
    assert void_fraction({"w.weight": weight}) == pytest.approx(expect)


def test_numba_cache_refresh_drops_kernels_when_sources_change(tmp_path):
    from parlm.ppm.jit_cache import refresh_numba_cache

    (tmp_path / "reference_mixture.py").write_text("a = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "reference_mixture._legacy_kernel-1.py311.nbi").write_text("stale")
    assert refresh_numba_cache(tmp_path) is True
    assert not list(cache.glob("*.nbi"))
    (cache / "reference_mixture._legacy_kernel-1.py311.nbi").write_text("fresh")
    assert refresh_numba_cache(tmp_path) is False  # unchanged sources keep the cache
    assert list(cache.glob("*.nbi"))
    (tmp_path / "reference_mixture.py").write_text("a = 2\n")
    assert refresh_numba_cache(tmp_path) is True and not list(cache.glob("*.nbi"))
