"""Hessian collection and GPTQ with SDClip scales (SPEC 4.2-4.3).

For a weight W [rows = out features, cols = in features] that sees inputs X [N, cols], GPTQ
minimises the layer-output error tr((W - Q s) H (W - Q s)^T) with H = X^T X, quantising one
column at a time and pushing each column's rounding error onto the columns not yet quantised
through the upper Cholesky factor of H^-1. The scale of each row is fixed beforehand by
SDClip: s_r = fp16(k * std(W_r) / R), with R = 2^(bits-1) - 1.

Speed (the math is the reference's):
- X^T X is accumulated with products that are exact in fp32: bf16 activations are multiplied
  on tensor cores with an fp32 output (or in TF32, which holds every bf16 value exactly);
- linears that read the very same input tensor (q/k/v of a block, and the MLP input of a
  parallel block) share one Hessian, detected at run time, and are quantised as one matrix
  with their rows stacked (GPTQ treats rows independently, so this changes nothing);
- matrices of equal shape (the same projection in every layer) are quantised as one batch.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

# Weights with more elements than this are GPTQ-quantised; the rest are stored in fp16 (SPEC 4.4).
REFERENCE_PASSTHROUGH_MAX_NUMEL = 65536
EMBEDDING_NAME = "tok_emb.weight"


def is_quantized_linear(name: str, module: nn.Module, max_numel: int) -> bool:
    """The reference's selection (SPEC 4.2): an nn.Linear with more than `max_numel` weights
    whose name places it in a block's attention or MLP."""
    return (isinstance(module, nn.Linear) and module.weight.numel() > max_numel
            and (".attn." in name or ".mlp." in name))


@contextlib.contextmanager
def matmul_precision(allow_tf32: bool):
    """Temporarily allow or forbid TF32 for CUDA fp32 matmuls (restored on exit). Uses the
    legacy `allow_tf32` switch, as `parlm.train` does: it keeps the legacy and the new
    precision settings consistent, which PyTorch checks on every matmul."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class GramAccumulator:
    """`hessian += X^T X` (fp32) for activations X [..., d].

    When X is bf16/fp16 on CUDA every product x_i x_j is exact in fp32, so the product runs on
    tensor cores: first as a bf16 GEMM with fp32 output, else in TF32 (which represents bf16
    and fp16 values exactly); fp32 accumulation either way. Otherwise a plain fp32 GEMM."""

    def __init__(self):
        self.mixed_gemm = True  # torch.mm(..., out_dtype=float32) not yet found missing

    def __call__(self, hessian: torch.Tensor, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        low_precision = x.dtype in (torch.bfloat16, torch.float16)
        if x.is_cuda and low_precision and self.mixed_gemm:
            try:
                hessian.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
                return
            except (RuntimeError, TypeError, NotImplementedError):
                self.mixed_gemm = False
        x = x.float()
        with matmul_precision(allow_tf32=x.is_cuda and low_precision):
            hessian.addmm_(x.t(), x)


class _HessianHooks:
    """Forward hooks that accumulate each selected linear's input Gram matrix.

    A linear whose input is the very tensor another linear read in the same forward pass
    shares that linear's Hessian. Sharing is decided on the first batch (where every linear
    also accumulates its own matrix, which must come out identical) and then used for the
    remaining batches, so each distinct activation is multiplied once."""

    RECENT = 6  # how many recent input tensors to compare against (q/k/v/proj/fc of a block)

    def __init__(self, device: torch.device, accumulate: GramAccumulator):
        self.device = device
        self.accumulate = accumulate
        self.hessians: dict[str, torch.Tensor] = {}
        self.first_batch = True
        self.sources: dict[str, set[str]] = defaultdict(set)  # name -> earlier names with the same input
        self.alias: dict[str, str] = {}
        self.recent: list[tuple[torch.Tensor, str]] = []
        self.rows: dict[str, int] = defaultdict(int)  # activation rows seen per linear (AWQ-lite's mean)

    def hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0]
            self.rows[name] += x.numel() // x.shape[-1]
            shared = next((owner for tensor, owner in self.recent if tensor is x), None)
            if self.first_batch:
                self.sources[name].add(shared)
            elif name in self.alias:
                return
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=self.device)
            self.accumulate(self.hessians[name], x)
            if shared is None:
                self.recent = (self.recent + [(x, name)])[-self.RECENT:]
        return record

    def end_batch(self) -> None:
        """Close a batch; after the first, fix which linears share a Hessian."""
        self.recent = []
        if self.first_batch:
            self.first_batch = False
            for name, owners in self.sources.items():
                owner = next(iter(owners))
                # Shared only when every call read the owner's input and both matrices agree
                # bit for bit (so the owner saw no other inputs either).
                if (len(owners) == 1 and owner is not None and owner not in self.alias
                        and torch.equal(self.hessians[name], self.hessians[owner])):
                    self.alias[name] = owner
                    del self.hessians[name]


@torch.no_grad()
def collect_hessians(model: nn.Module, batches, max_numel: int = REFERENCE_PASSTHROUGH_MAX_NUMEL,
                     progress=None, embedding: bool = True,
                     row_counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Calibration Hessians H = (1/n_batches) sum_batches X^T X, fp32 (SPEC 4.2).

    `batches` yields input_ids [B, T]. The model runs as given (the caller sets eval mode and
    `looping_active`; no autocast), so looped blocks contribute once per application. Keys
    are `<linear>.weight` for every selected linear of the attention/MLP blocks
    (`is_quantized_linear`) and `tok_emb.weight`, whose Hessian is taken on the final-norm
    output `model.forward_hidden(x)` (the tied head's input) unless `embedding` is False.
    Linears that read the same input map to the same tensor object. `row_counts`, if given,
    receives the number of activation rows behind each key's X^T X (so that
    mean(x_c^2) = H_cc * n_batches / rows, AWQ-lite's activation statistic)."""
    device = next(model.parameters()).device
    accumulate = GramAccumulator()
    names = [name for name, module in model.named_modules() if is_quantized_linear(name, module, max_numel)]
    hooks = _HessianHooks(device, accumulate)
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hooks.hook(name)) for name in names]
    dim = model.tok_emb.weight.shape[1]
    embedding_hessian = torch.zeros(dim, dim, dtype=torch.float32, device=device)
    count = embedding_rows = 0
    try:
        for input_ids in batches:
            hidden = model.forward_hidden(input_ids.to(device))
            embedding_rows += hidden.numel() // hidden.shape[-1]
            if embedding:
                accumulate(embedding_hessian, hidden)
            hooks.end_batch()
            count += 1
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("collect_hessians needs at least one calibration batch")
    result: dict[str, torch.Tensor] = {}
    for name, hessian in hooks.hessians.items():
        result[name + ".weight"] = hessian.div_(count)
    for name, owner in hooks.alias.items():
        result[name + ".weight"] = result[owner + ".weight"]
    if embedding:
        result[EMBEDDING_NAME] = embedding_hessian.div_(count)
    if row_counts is not None:
        for name in names:
            row_counts[name + ".weight"] = hooks.rows[name]
        if embedding:
            row_counts[EMBEDDING_NAME] = embedding_rows
    return result


# ----------------------------------------------------------------------------------------
# GPTQ
def sdclip_scales(weight: torch.Tensor, clip_sigmas: float, clip_range: int) -> torch.Tensor:
    """Per-row fp16 step sizes s_r = fp16(max(k * std(W_r) / R, 1e-10)) (unbiased std; SPEC 4.3).

    parlm addition for degenerate rows only: where that underflows to 0 in fp16 (a constant
    row, e.g. a zero-initialised projection), s_r = fp16(max|W_r| / R), or 2^-24 (the smallest
    fp16) for an all-zero row, so that every code is defined."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    scales = (clip_sigmas * weight.std(dim=-1) / clip_range).clamp_min(1e-10).to(torch.float16)
    zero = scales == 0
    if zero.any():
        fallback = (weight.abs().amax(dim=-1) / clip_range).to(torch.float16)
        fallback = fallback.masked_fill(fallback == 0, 2.0 ** -24)
        scales = torch.where(zero, fallback, scales)
    return scales


def _gather_columns(matrix: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """matrix[b][:, order[b]] for a batch [B, R, C] and orders [B, C]."""
    return torch.gather(matrix, 2, order[:, None, :].expand_as(matrix))


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, clip_sigmas: float, clip_range: int,
                  block_size: int = 128, damping: float = 0.01, protected: torch.Tensor | None = None,
                  protected_range: int = 127) -> tuple[torch.Tensor, ...]:
    """GPTQ of W [rows, cols] (or a batch [B, rows, cols] with Hessians [B, cols, cols]) to
    int8 codes Q in [-R, R] and fp16 row scales s with W ~ Q * s[:, None] (SPEC 4.3).

    1. dead columns (H_ii = 0): H_ii := 1 and W[:, i] := 0;
    2. H += damping * mean(diag H) * I;
    3. act-order: columns sorted by diag H, descending;
    4. U = upper Cholesky factor of H^-1;
    5. s = SDClip scales of the original W (`sdclip_scales`);
    6. per block of `block_size` columns, column j: q = clamp(round(w_j / s), -R, R),
       e = (w_j - q s) / U_jj, w_k -= e U_jk for the block's later columns k; after the block,
       W[:, later] -= E U[block, later];
    7. columns back to the original order.
    Runs in the input's precision (fp32 for fp32/bf16 input; fp64 stays fp64) on its device,
    with TF32 off.

    AWQ-lite (PR #1908): where the bool mask `protected` (W's shape) is set, the code is
    q = clamp(round(w / s_hi), -R_hi, R_hi) with s_hi = SDClip scale at R_hi =
    `protected_range`, inside the same sweep (its error propagates like any other); the
    result is then (Q, s, s_hi) and W ~ Q * (s_hi where protected, else s)."""
    single = weight.ndim == 2
    if single:
        weight, hessian = weight[None], hessian[None]
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    original = weight.to(dtype)
    hessian = hessian.to(device=weight.device, dtype=dtype).clone()
    batch, rows, cols = original.shape
    scales = sdclip_scales(original, clip_sigmas, clip_range)
    step = scales.to(dtype)
    if protected is not None:
        protected = protected[None] if single else protected
        high_scales = sdclip_scales(original, clip_sigmas, protected_range)
        high_step = high_scales.to(dtype)
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1.0)
    work = original.masked_fill(dead[:, None, :], 0.0)
    diagonal.add_(damping * diagonal.mean(dim=-1, keepdim=True))
    order = torch.argsort(diagonal, dim=-1, descending=True, stable=True)
    inverse_order = torch.argsort(order, dim=-1)
    work = _gather_columns(work, order)
    if protected is not None:
        protected = _gather_columns(protected.to(weight.device), order)
    hessian = _gather_columns(torch.gather(hessian, 1, order[:, :, None].expand_as(hessian)), order)
    with matmul_precision(allow_tf32=False):
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
        codes = torch.empty(batch, rows, cols, dtype=torch.int8, device=weight.device)
        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            block = work[:, :, start:end].clone()
            block_upper = upper[:, start:end, start:end]
            errors = torch.empty_like(block)
            for j in range(end - start):
                column = block[:, :, j]
                column_step, limit = step, clip_range
                if protected is not None:
                    mask = protected[:, :, start + j]
                    column_step = torch.where(mask, high_step, step)
                    limit = torch.where(mask, protected_range, clip_range).to(dtype)
                    quantized = torch.minimum(torch.maximum(torch.round(column / column_step), -limit), limit)
                else:
                    quantized = torch.clamp(torch.round(column / step), -clip_range, clip_range)
                codes[:, :, start + j] = quantized.to(torch.int8)
                error = (column - quantized * column_step) / block_upper[:, j, j, None]
                errors[:, :, j] = error
                block[:, :, j:] -= error[:, :, None] * block_upper[:, None, j, j:]
            if end < cols:
                work[:, :, end:] -= torch.bmm(errors, upper[:, start:end, end:])
    codes = _gather_columns(codes, inverse_order)
    result = (codes, scales) if protected is None else (codes, scales, high_scales)
    return tuple(part[0] for part in result) if single else result


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = Q * s[:, None], computed in fp32 and cast to `dtype` (SPEC 4.3)."""
    return (codes.float() * scales.float().view(codes.shape[0], *[1] * (codes.ndim - 1))).to(dtype)


def quantization_plan(state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                      max_numel: int) -> dict[str, str]:
    """Method per tensor (SPEC 4.4): "gptq" for float tensors with more than `max_numel`
    elements, "fp16" for smaller float tensors, "raw" for the rest."""
    plan = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            plan[name] = "raw"
        elif tensor.numel() <= max_numel:
            plan[name] = "fp16"
        else:
            if name not in hessians:
                raise KeyError(f"{name} ({tuple(tensor.shape)}) needs GPTQ but has no calibration "
                               f"Hessian; only attention/MLP linears and tok_emb get one")
            plan[name] = "gptq"
    return plan


def clip_sigmas_of(name: str, config) -> float:
    """SDClip multiplier k of one tensor: embed_clip_sigmas for tok_emb; mlp_clip_sigmas for
    MLP weights and attn_clip_sigmas for attention weights when set (> 0; PR #1769: k = 12 for
    the MLP, PR #1855/#2135: per-kind k), else matrix_clip_sigmas (SPEC 4.3). The clip is
    +-k std(W_r) and the step k std(W_r) / R."""
    if name == EMBEDDING_NAME:
        return config.embed_clip_sigmas
    if ".mlp." in name and config.mlp_clip_sigmas > 0:
        return config.mlp_clip_sigmas
    if ".attn." in name and config.attn_clip_sigmas > 0:
        return config.attn_clip_sigmas
    return config.matrix_clip_sigmas


@torch.no_grad()
def gptq_quantize_state(state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                        config, device: torch.device | str,
                        protected: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """GPTQ every "gptq" tensor of `quantization_plan` on `device`: name -> (int8 codes, fp16
    scales) on the CPU. int8 (R=127, k=embed_clip_sigmas) for tok_emb, int<matrix_bits> with
    k=`clip_sigmas_of` otherwise. Tensors sharing a Hessian are stacked by rows, and stacks
    of equal shape and settings run as one batch. `protected` (name -> input-column indices,
    AWQ-lite) quantizes those columns at awq_lite_bits; such names map to (codes, scales,
    high scales)."""
    protected = protected or {}
    plan = quantization_plan(state_dict, hessians, config.quant_passthrough_max_numel)
    stacks: dict[tuple, list[str]] = defaultdict(list)
    for name, method in plan.items():
        if method == "gptq":
            bits = config.embed_bits if name == EMBEDDING_NAME else config.matrix_bits
            stacks[(id(hessians[name]), bits, clip_sigmas_of(name, config))].append(name)
    batches: dict[tuple, list[list[str]]] = defaultdict(list)
    for (_, bits, sigmas), names in stacks.items():
        rows = sum(state_dict[n].shape[0] for n in names)
        cols = state_dict[names[0]].shape[1]
        batches[(rows, cols, bits, sigmas, any(n in protected for n in names))].append(names)
    result = {}
    for (rows, cols, bits, sigmas, has_protected), members in batches.items():
        weight = torch.stack([torch.cat([state_dict[n].to(device, torch.float32) for n in names])
                              for names in members])
        hessian = torch.stack([hessians[names[0]].to(device) for names in members])
        mask = None
        if has_protected:
            mask = torch.zeros(weight.shape, dtype=torch.bool)
            for index, names in enumerate(members):
                offset = 0
                for name in names:
                    count = state_dict[name].shape[0]
                    if name in protected:
                        mask[index, offset:offset + count, protected[name]] = True
                    offset += count
        parts = gptq_quantize(weight, hessian, sigmas, 2 ** (bits - 1) - 1, config.gptq_block_size,
                              config.gptq_damping, protected=mask,
                              protected_range=2 ** (config.awq_lite_bits - 1) - 1)
        parts = [part.cpu() for part in parts]
        for index, names in enumerate(members):
            offset = 0
            for name in names:
                count = state_dict[name].shape[0]
                pieces = tuple(part[index, offset:offset + count].clone() for part in parts)
                result[name] = pieces if name in protected else pieces[:2]
                offset += count
    return result
