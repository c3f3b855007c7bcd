"""The `ppm` pipeline stage: the legacy PR #1858 byte mixture over a run's NLL dump.

Reads `<run_dir>/nll.npz` (target, prev, nll per scored position in stream order; nll_mix when
the valid mixture ran) and writes
- `ppm.json`: mix_bpb, ppm_only_bpb, nn_only_bpb, gate_skip, bytes, seconds, subset_tokens
  (labelled `normalized: false` with a note: NOT a valid BPB, SPEC 6.6), bytes being the run's
  BPB denominator (`parlm.data.accounting`, as every scorer) and stream_bytes the bytes the
  mixture predicts (the scored tokens' pieces; they differ for CaseOps data), plus on the same
  positions the plain neural BPB (BOS NLL included, as the neural scorers count it) and the
  valid token mixture's BPB when nll_mix exists, the audit summary and the void fraction;
- `ppm_trace.npz`: per-byte gate traces (every trace_stride-th byte: byte, lambda choice,
  confidence, gate skip, position in token, token id, nn/ppm/mix log-probs), exact aggregates
  (lambda counts, confidence histogram, gate choices by position in token and by token id, token
  frequencies), cumulative NLL curves and the audit arrays.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from parlm.data.accounting import byte_accounting, piece_tables
from parlm.quant.artifact import ARTIFACT_NAME, CHECKPOINT_NAME, load_checkpoint, verify_artifact
from parlm.runlog import RunLogger, atomic_write_bytes, read_json, write_json
from parlm.ppm.bytestream import TokenByteLayout
from parlm.ppm.diagnostics import void_fraction
from parlm.ppm.reference_mixture import legacy_mixture

LOG2 = math.log(2.0)


def load_nll(path) -> dict[str, np.ndarray]:
    """The NLL dump as a dict of arrays; FileNotFoundError says how to make it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run the eval stage first "
                                f"(`python -m parlm.eval --run-dir {path.parent}`)")
    with np.load(path) as data:
        missing = {"target", "prev", "nll"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; expected target, prev, nll")
        return {name: data[name] for name in data.files}


def audit_positions(counts: np.ndarray, how_many: int) -> np.ndarray:
    """`how_many` scored positions with at least one byte, evenly spread over the stream."""
    candidates = np.flatnonzero(counts > 0)
    if how_many <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    picks = np.linspace(0, len(candidates) - 1, num=min(how_many, len(candidates)))
    return np.unique(candidates[np.round(picks).astype(np.int64)])


def model_logprobs(config, run_dir, positions: np.ndarray, device="cpu") -> np.ndarray:
    """log softmax over the vocabulary at each position (float64 [S, V]) from the run's
    quantized artifact with plain context (the last eval_seq_len tokens; not TTT-adapted)."""
    import torch

    from parlm.data.shards import load_validation_tokens
    from parlm.dist import autocast_context
    from parlm.quant.stage import load_quantized_model

    device = torch.device(device)
    model = load_quantized_model(config, Path(run_dir) / ARTIFACT_NAME, device)
    model.eval()
    tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens).to(torch.int64)
    out = np.zeros((len(positions), config.vocab_size))
    with torch.no_grad():
        for row, position in enumerate(positions):  # window ending at the position
            start = max(0, int(position) + 1 - config.eval_seq_len)
            window = tokens[start:int(position) + 1].to(device)[None]
            with autocast_context(device):
                logits = model.forward_logits(window)
            out[row] = torch.log_softmax(logits[0, -1].double(), -1).cpu().numpy()
    return out


def _void_from_checkpoint(run_dir: Path) -> tuple[float | None, str]:
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        return None, f"unavailable (no {CHECKPOINT_NAME})"
    state = load_checkpoint(checkpoint)
    return void_fraction(state), (f"{CHECKPOINT_NAME}: EMA weights before quantization and TTT "
                                  "(the reference used the TTT-adapted weights); logged only")


def ppm_run(config, run_dir, audit_count: int = 64, audit_neural: str = "auto",
            progress: bool = True) -> dict:
    """Run the legacy mixture with the config's PPM settings; write ppm.json + ppm_trace.npz.

    audit_neural: "model" (log-softmax rows from the artifact), "spread" (NLL-consistent
    stand-in), or "auto" (model when final_model.int6.ptz exists, else spread)."""
    run_dir = Path(run_dir)
    logger = RunLogger(run_dir, "ppm.log")
    if not config.ppm_enabled:
        logger.log("ppm: ppm_enabled=False; nothing scored")
        out = {"enabled": False, "normalized": False}
        write_json(run_dir / "ppm.json", out)
        return out
    verify_artifact(run_dir)  # nll.npz and the audit's model rows come from this artifact
    dump = load_nll(run_dir / "nll.npz")
    subset = int(config.ppm_subset_tokens)
    keep = len(dump["target"]) if subset <= 0 else min(subset, len(dump["target"]))
    accounting = byte_accounting(config, keep + 1)  # nll.npz's targets are stream positions 1..keep
    layout = TokenByteLayout.from_byte_tables(piece_tables(accounting))
    target, prev, nll = dump["target"][:keep], dump["prev"][:keep], dump["nll"][:keep]
    counts = layout.byte_counts(target, prev)
    positions = audit_positions(counts, audit_count)
    neural = audit_neural
    if neural == "auto":
        neural = "model" if (run_dir / ARTIFACT_NAME).exists() else "spread"
    logprobs = None
    if neural == "model" and len(positions):
        from parlm.dist import resolve_device

        logprobs = model_logprobs(config, run_dir, positions, resolve_device(config.device))
    if (run_dir / "ppm.json").exists():
        old = read_json(run_dir / "ppm.json")
        logger.log(f"ppm: replacing existing ppm.json (mix_bpb={old.get('mix_bpb')})")
    logger.log(f"ppm: legacy PR #1858 mixture over {keep:,} positions (order {config.ppm_order}); "
               f"NOT a normalized distribution")
    result = legacy_mixture(target, prev, nll, layout, order=config.ppm_order,
                            lambda_hi=config.ppm_lambda_hi, lambda_lo=config.ppm_lambda_lo,
                            conf_threshold=config.ppm_conf_threshold,
                            anti_hijack_nats=config.ppm_anti_hijack_nats, progress=progress,
                            audit_positions=positions, audit_logprobs=logprobs)
    out = result.summary()
    out["subset_tokens"] = keep
    out["positions_available"] = int(len(dump["target"]))
    bytes_total = float(charge_denominator(out, accounting, target, prev))
    out["neural_bpb_same_positions"] = float(nll.sum() / (LOG2 * bytes_total)) if bytes_total else None
    if "nll_mix" in dump:
        out["mix_valid_bpb_same_positions"] = float(dump["nll_mix"][:keep].sum() / (LOG2 * bytes_total))
    if "source" in dump:
        out["nll_source"] = str(dump["source"])
    eval_json = run_dir / "eval.json"
    if eval_json.exists():
        evaluation = read_json(eval_json)
        out["eval_ttt_bpb"] = evaluation.get("ttt_bpb")
        out["eval_mix_valid_bpb"] = evaluation.get("mix_valid_bpb")
    out["audit"] = result.audit.summary() if result.audit is not None else None
    out["void_fraction"], out["void_fraction_source"] = _void_from_checkpoint(run_dir)
    write_traces(run_dir / "ppm_trace.npz", result, target, counts)
    write_json(run_dir / "ppm.json", out)
    logger.log(f"ppm_mix bytes={out['bytes']} mix_bpb={out['mix_bpb']:.6f} "
               f"ppm_only={out['ppm_only_bpb']:.6f} nn_only={out['nn_only_bpb']:.6f} "
               f"gate_skip={100 * result.gate_skip:.2f}% time={result.seconds:.1f}s (not normalized)")
    logger.metric("ppm", **{k: v for k, v in out.items() if not isinstance(v, dict)})
    return out


def charge_denominator(out: dict, accounting, target: np.ndarray, prev: np.ndarray) -> int:
    """Set ppm.json's byte fields from the run's one accounting and return the denominator.

    bytes = Σ accounting.count_bytes(target, prev, positions 1..n) (the scorers' rule);
    stream_bytes = the bytes the mixture predicted (the legacy result's `bytes`). When they
    differ (CaseOps: the pieces spell the transformed text, a bijection of the original), the
    mixture's total code length is charged to the original bytes:
    mix/ppm_only/nn_only_bpb ← bpb · stream_bytes / bytes. Plain data: equal, left as is."""
    stream_bytes = int(out["bytes"])
    denominator = int(accounting.count_bytes(target, prev, 1).sum())
    out["stream_bytes"] = stream_bytes
    if denominator != stream_bytes and denominator > 0:
        for key in ("mix_bpb", "ppm_only_bpb", "nn_only_bpb"):
            out[key] = out[key] * stream_bytes / denominator
        out["bytes"] = denominator
    return denominator


def write_traces(path, result, target: np.ndarray, counts: np.ndarray) -> None:
    """ppm_trace.npz (module docstring), compressed, written atomically."""
    arrays = {f"trace_{name}": values for name, values in result.trace.items()}
    arrays["trace_gate_skip"] = (result.trace.get("lambda_choice", np.zeros(0)) == 2)
    scored = target[counts > 0].astype(np.int64)
    arrays.update(
        lambda_counts=result.lambda_counts, confidence_histogram=result.confidence_histogram,
        position_stats=result.position_stats, token_stats=result.token_stats,
        token_frequency=np.bincount(scored[scored >= 0], minlength=len(result.token_stats)),
        curve=result.curve, curve_every=np.array(result.curve_every),
        trace_stride=np.array(result.trace_stride), bytes=np.array(result.bytes))
    if result.audit is not None:
        for name in ("positions", "ppm_total", "constant_total", "nn_first_total", "first_total",
                     "ppmd_total", "token_total", "zero_byte_candidates", "realised_log_product"):
            arrays[f"audit_{name}"] = getattr(result.audit, name)
        arrays["audit_neural"] = np.array(result.audit.neural)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_traces(path) -> dict[str, np.ndarray]:
    """ppm_trace.npz as a dict (for plots)."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}

