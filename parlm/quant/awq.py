"""AWQ-lite (PR #1908): activation-aware mixed precision inside GPTQ.

Activation-aware quantization keeps the weights that meet large activations more precise. PR
#1908's light version, on top of the calibration pass GPTQ already runs:

    rms_c      = sqrt(mean_tokens x_c^2)              per input channel c of a linear
    saliency_c = rms_c * mean_rows |W_rc|
    score_g    = sum_{c in g} saliency_c              per group g of `group_size` adjacent columns

The `groups` highest-scoring groups over all GPTQ tensors quantized narrower than `bits`
(int6 matrices; the int8 embedding is not a candidate) are coded at `bits` (int8) with their
own row scales s_hi = SDClip(k, R_hi), in the same GPTQ sweep as the rest of the matrix
(`gptq_quantize(protected=...)`), so their rounding error is compensated like any other.
Stored per protected tensor: `<name>.awq_columns` (int32 column indices) and
`<name>.awq_scale` (fp16 per-row s_hi); W_hat[:, columns] = Q[:, columns] * s_hi.
"""
from __future__ import annotations

import torch

COLUMNS_SUFFIX = ".awq_columns"
SCALE_SUFFIX = ".awq_scale"


def activation_rms(hessian: torch.Tensor, rows: int, batches: int) -> torch.Tensor:
    """rms_c = sqrt(mean x_c^2) from H = (1/batches) sum X^T X over `rows` activation rows:
    mean x_c^2 = H_cc * batches / rows."""
    return (hessian.diagonal().float().cpu() * batches / max(rows, 1)).clamp_min(0).sqrt()


def salient_column_groups(state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                          row_counts: dict[str, int], batches: int, candidates: list[str],
                          groups: int, group_size: int) -> dict[str, torch.Tensor]:
    """name -> sorted column indices of the `groups` best groups (score_g in the module
    docstring) among the `candidates` tensors; ties keep the earlier tensor and column."""
    scored = []
    for order, name in enumerate(candidates):
        weight = state_dict[name].float()
        saliency = activation_rms(hessians[name], row_counts[name], batches) * weight.abs().mean(dim=0).cpu()
        full = weight.shape[1] // group_size
        scores = saliency[:full * group_size].reshape(full, group_size).sum(dim=1)
        scored.extend((-float(score), order, index, name) for index, score in enumerate(scores))
    scored.sort()
    chosen: dict[str, list[int]] = {}
    for _, _, index, name in scored[:groups]:
        chosen.setdefault(name, []).extend(range(index * group_size, (index + 1) * group_size))
    return {name: torch.tensor(sorted(columns), dtype=torch.long) for name, columns in chosen.items()}


def restore_protected_columns(name: str, value: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """W_hat[:, columns] = Q[:, columns] * s_hi[:, None] where the artifact holds AWQ-lite
    columns for `name` (fp32); `value` unchanged otherwise."""
    if name + COLUMNS_SUFFIX not in weights:
        return value
    columns = weights[name + COLUMNS_SUFFIX].long()
    codes = weights[name + ".q"]
    value = value.clone()
    value[:, columns] = codes[:, columns].float() * weights[name + SCALE_SUFFIX].float()[:, None]
    return value
