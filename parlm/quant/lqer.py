"""LQER low-rank quantization-error correction (PR #1797, "LQER asymmetric rank-4, top-3").

After GPTQ, the residual of a tensor is E = W - W_hat (W_hat = the dequantized codes). For
the `top_k` GPTQ tensors with the largest ||E||_F, a rank-r truncated SVD

    E ~ A B,   A = U_r diag(S_r) [rows, r],   B = V_r^T [r, cols]

is stored with both factors quantized to asymmetric signed ranges (the PR's "asym" packing):

    A: int2 codes in [-2, 1], one fp16 scale for the matrix   s_A = max|A| / 1.5
    B: int4 codes in [-8, 7], one fp16 scale per group of `group_size` consecutive elements
       of B flattened row-major                               s_B,g = max_g|B| / 7.5

(a group size that does not divide B's size falls back to one group per row of B), and at
load W_hat + (q_A s_A)(q_B s_B) replaces W_hat. Keys per corrected tensor: `<name>.lqer_a`,
`<name>.lqer_a_scale`, `<name>.lqer_b`, `<name>.lqer_b_scale`, stored in the artifact's
"corrections" stream, so their bytes are part of bytes_model.
"""
from __future__ import annotations

import torch

A_LOW, A_HIGH, A_DIVISOR = -2, 1, 1.5  # int2, asymmetric
B_LOW, B_HIGH, B_DIVISOR = -8, 7, 7.5  # int4, asymmetric
SUFFIXES = (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")


def quantize_factors(a: torch.Tensor, b: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Codes and fp16 scales of A and B (module docstring), keyed by suffix."""
    a_scale = (a.abs().amax().clamp_min(1e-10) / A_DIVISOR).to(torch.float16).reshape(1)
    a_codes = torch.clamp(torch.round(a / a_scale.float()), A_LOW, A_HIGH).to(torch.int8)
    group = group_size if b.numel() % group_size == 0 else b.shape[1]
    flat = b.reshape(-1, group)
    b_scale = (flat.abs().amax(dim=1).clamp_min(1e-10) / B_DIVISOR).to(torch.float16)
    b_codes = torch.clamp(torch.round(flat / b_scale.float()[:, None]), B_LOW, B_HIGH).to(torch.int8)
    return {".lqer_a": a_codes, ".lqer_a_scale": a_scale, ".lqer_b": b_codes.reshape(b.shape),
            ".lqer_b_scale": b_scale}


def correction(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(q_A s_A)(q_B s_B) in fp32 from the stored factors (group size = |B| / #scales)."""
    a = parts[".lqer_a"].float() * parts[".lqer_a_scale"].float()
    b_codes, b_scale = parts[".lqer_b"], parts[".lqer_b_scale"]
    group = b_codes.numel() // b_scale.numel()
    b = (b_codes.reshape(-1, group).float() * b_scale.float()[:, None]).reshape(b_codes.shape)
    return a @ b


@torch.no_grad()
def lqer_corrections(originals: dict[str, torch.Tensor], dequantized: dict[str, torch.Tensor],
                     top_k: int, rank: int, group_size: int) -> dict[str, torch.Tensor]:
    """Stored LQER tensors (`<name><suffix>` -> tensor, CPU) for the `top_k` names of
    `dequantized` with the largest ||W - W_hat||_F (ties: the earlier name)."""
    errors = {name: originals[name].float().cpu() - dequantized[name].float().cpu() for name in dequantized}
    norms = {name: float(error.norm()) for name, error in errors.items()}
    ranked = sorted(errors, key=lambda name: -norms[name])  # stable: ties keep the earlier name
    stored = {}
    for name in ranked[:top_k]:
        u, s, vh = torch.linalg.svd(errors[name].double(), full_matrices=False)
        r = min(rank, s.numel())
        parts = quantize_factors((u[:, :r] * s[:r]).float(), vh[:r].float().contiguous(), group_size)
        stored.update({name + suffix: tensor for suffix, tensor in parts.items()})
    return stored


def apply_correction(name: str, value: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """value + A B where the artifact holds LQER factors for `name` (fp32); else value."""
    if name + ".lqer_a" not in weights:
        return value
    return value + correction({suffix: weights[name + suffix] for suffix in SUFFIXES})
