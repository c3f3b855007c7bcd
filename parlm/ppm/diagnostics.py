"""The "void fraction compass" of PR #1858 (SPEC 6.5): a logged number with no effect.

void = Σ_tensors #{|w| <= mean|w| of its tensor} / Σ_tensors numel, over every floating tensor
of a state dict with more than 1000 entries and "weight" in its name (so `skip_weights` counts,
as in the reference). The reference computes it from the TTT-adapted weights and passes it to
the mixture only to be logged; its docstring's "modulates lambda_hi" has no code behind it.
"""
from __future__ import annotations

from typing import Mapping

import torch


def void_fraction(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Fraction of entries at or below their tensor's mean magnitude (module docstring)."""
    below = 0.0
    total = 0
    for name, weight in state_dict.items():
        if not (torch.is_tensor(weight) and weight.is_floating_point()):
            continue
        if weight.numel() <= 1000 or "weight" not in name:
            continue
        magnitude = weight.detach().abs()
        below += float((magnitude <= magnitude.float().mean().to(magnitude.dtype)).sum())
        total += weight.numel()
    return below / max(total, 1)
