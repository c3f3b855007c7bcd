"""Per-tensor quantization statistics for quant.json and the notebook: relative errors (plain
and Hessian-weighted), scale quantiles, code range, clipping and entropy."""
from __future__ import annotations

from pathlib import Path

import torch

from parlm import dist, runlog
from parlm.data.accounting import byte_accounting
from parlm.data.shards import load_validation_tokens
from parlm.model.gpt import build_model
from parlm.model.validation import eval_val
from parlm.quant.artifact import ARTIFACT_NAME, CHECKPOINT_NAME, dequantize_state, load_quantized_model


@torch.no_grad()
def tensor_statistics(state_dict, weights, methods, hessians, device) -> dict[str, dict]:
    """Per tensor: method, shape, relative Frobenius error ||W - W_hat|| / ||W||, and for GPTQ
    tensors the Hessian-weighted relative error sqrt(tr(D H D^T) / tr(W H W^T)) (D = W - W_hat),
    scale quantiles, code range, clipped fraction (|q| = R) and order-0 code entropy (bits)."""
    template = {name: tensor.float() for name, tensor in state_dict.items() if tensor.is_floating_point()}
    restored = dequantize_state(weights, methods, {n: t for n, t in template.items()})
    stats = {}
    for name, original in template.items():
        original = original.to(device)
        delta = original - restored[name].to(device)
        norm = original.norm().item()
        entry = {"method": methods[name], "shape": list(original.shape), "numel": original.numel(),
                 "rel_error": delta.norm().item() / norm if norm > 0 else 0.0}
        if methods[name].startswith("gptq"):
            codes, scales = weights[name + ".q"], weights[name + ".scale"].float()
            hessian = hessians[name].to(device)
            weighted = (original @ hessian * original).sum().item()
            error = (delta @ hessian * delta).sum().item()
            entry["rel_hessian_error"] = (error / weighted) ** 0.5 if weighted > 0 else 0.0
            bits = int(methods[name].split("(int")[1].split(")")[0])  # "gptq (int6)[+lqer...]"
            clip_range = 2 ** (bits - 1) - 1
            quantiles = torch.quantile(scales, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0]))
            counts = torch.bincount(codes.flatten().long() + 128, minlength=256).double()
            probabilities = counts[counts > 0] / counts.sum()
            entry.update(
                bits=bits,
                scale_quantiles=dict(zip(("min", "p05", "median", "p95", "max"), quantiles.tolist())),
                scale_mean=scales.mean().item(),
                code_min=int(codes.min()), code_max=int(codes.max()),
                clip_fraction=(codes.abs() == clip_range).double().mean().item(),
                code_entropy_bits=float(-(probabilities * probabilities.log2()).sum()),
            )
        stats[name] = entry
    return stats


def bpb_before_after(config, run_dir, reuse_prequant: bool = True) -> dict:
    """Plain validation BPB (`parlm.eval.eval_val`, SPEC 5.1) of the EMA model
    (final_model.pt) and of the model rebuilt from the artifact, both with looping on and the
    run's byte accounting (`parlm.data.accounting.byte_accounting`):
    {"prequant": bpb, "quantized": bpb, "rise": quantized - prequant, "prequant_source"}.
    With `reuse_prequant` the EMA number is train.json's `prequant_bpb` (the same eval_val of
    the same weights, run at the end of training) when present."""
    run_dir = Path(run_dir)
    ctx = dist.init_distributed(config.device)
    val_tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    byte_tables = byte_accounting(config, val_tokens.numel())  # tables, or the raw-text sidecar
    train = runlog.read_json(run_dir / "train.json") if (run_dir / "train.json").exists() else {}
    if reuse_prequant and train.get("prequant_bpb") is not None:
        before, source = float(train["prequant_bpb"]), "train.json"
    else:
        model = build_model(config, ctx.device)
        model.load_state_dict(torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True))
        model.looping_active = True
        before, source = eval_val(config, model, val_tokens, byte_tables, ctx).bpb, "eval_val"
        del model
    quantized = load_quantized_model(config, run_dir / ARTIFACT_NAME, ctx.device)
    after = eval_val(config, quantized, val_tokens, byte_tables, ctx).bpb
    return {"prequant": before, "quantized": after, "rise": after - before, "prequant_source": source}
