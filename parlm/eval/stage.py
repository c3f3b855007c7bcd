"""The pipeline's "eval" stage: `evaluate_run(config, run_dir)` and `python -m parlm.eval`.

Deserializes the run's artifact and measures, as the reference does after quantization
(SPEC 5): plain BPB ("quantized"), sliding-window BPB and score-first TTT BPB, plus parlm's
valid token mixture when `mixture_enabled`. Compile time is measured on dummy batches before
each timed stage and reported separately. Plain and sliding evaluation leave the weights
untouched, so TTT adapts the same model in place and reuses the sliding scorer's compiled
graphs; the reference reloads the artifact and compiles again.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from parlm import dist
from parlm.cli import stage_command
from parlm.config import Config, compile_enabled
from parlm.data.accounting import byte_accounting
from parlm.data.shards import load_validation_tokens
from parlm.dist import autocast_context, synchronize
from parlm.eval.scoring import WindowScorer, eval_val_sliding
from parlm.eval.budget import projection_for_run
from parlm.eval.lora_ttt import eval_val_lora_ttt
from parlm.eval.ngram_tilt import NgramTilt
from parlm.eval.ttt import eval_val_ttt, reduce_to_main
from parlm.model.validation import EvalResult, eval_val, plain_batch_plan
from parlm.quant.artifact import ARTIFACT_NAME, OVER_CAP_NAME, ArtifactError, load_quantized_model, verify_artifact
from parlm.runlog import RunLogger, atomic_write_bytes, read_json, write_json



def compile_plain_model(config: Config, model, total_tokens: int, ctx):
    """(model for `eval_val`, compile seconds): compiled with dynamic=False, fullgraph=True
    when compile is on and `eval_compile_plain`, and warmed up on dummy batches of every shape
    eval_val will use; else the model itself and 0.0."""
    if not (config.eval_compile_plain and compile_enabled(config, ctx.device)):
        return model, 0.0
    t0 = time.perf_counter()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    seq_start, seq_end, batch_seqs = plain_batch_plan(config, total_tokens, ctx.rank, ctx.world_size)
    n_seqs = seq_end - seq_start
    shapes = {min(batch_seqs, n_seqs)} | ({n_seqs % batch_seqs} if n_seqs % batch_seqs else set())
    model.eval()
    with torch.no_grad():
        for size in sorted(s for s in shapes if s > 0):
            x = torch.zeros(size, config.eval_seq_len, dtype=torch.int64, device=ctx.device)
            with autocast_context(ctx.device):  # distinct tensors: aliasing is guarded
                compiled(x, torch.zeros_like(x))
    synchronize(ctx.device)
    return compiled, time.perf_counter() - t0


def reset_compiler(config: Config, device) -> None:
    """Drop compiled graphs between phases (the reference calls torch._dynamo.reset())."""
    if compile_enabled(config, device):
        torch._dynamo.reset()


def write_nll(path, val_tokens: torch.Tensor, nll: np.ndarray, nll_mix: np.ndarray | None,
              source: str) -> None:
    """nll.npz: target = tokens[1:T+1], prev = tokens[0:T] (int64), nll (float64 nats), one
    entry per scored position in stream order; nll_mix when the valid mixture ran."""
    tokens = val_tokens.to(torch.int64).numpy()
    total = len(nll)
    arrays = {"target": tokens[1:total + 1], "prev": tokens[:total], "nll": nll.astype(np.float64),
              "source": np.array(source)}
    if nll_mix is not None:
        arrays["nll_mix"] = nll_mix.astype(np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def add_sliding_to_chunks(chunks: list[dict], sliding_nll: np.ndarray, val_tokens: torch.Tensor,
                          byte_tables) -> None:
    """Add `sliding_loss`/`sliding_bpb` (the frozen model's sliding score on the same
    positions) to each TTT chunk record, so per-chunk and cumulative TTT gains can be read:
    sliding_bpb = Σ_{p in [start, end)} nll_p / (ln 2 · Σ bytes of the targets at p + 1), bytes
    from the run's byte accounting (`parlm.data.accounting.byte_accounting`)."""
    tokens = val_tokens.to(torch.int64).numpy()
    for chunk in chunks:
        start, end = chunk["start"], chunk["end"]
        nll_sum = float(sliding_nll[start:end].astype(np.float64).sum())
        nbytes = float(byte_tables.count_bytes(tokens[start + 1:end + 1], tokens[start:end], start + 1).sum())
        chunk["sliding_loss"] = nll_sum / max(end - start, 1)
        chunk["sliding_bpb"] = nll_sum / (math.log(2) * nbytes) if nbytes else float("nan")


def artifact_path(config: Config, run_dir: Path) -> Path:
    """The run folder's artifact; FileNotFoundError saying what to do when it is missing (or
    only the over-cap copy exists, which is no valid submission)."""
    artifact = run_dir / ARTIFACT_NAME
    if artifact.exists():
        return artifact
    if (run_dir / OVER_CAP_NAME).exists():
        raise FileNotFoundError(
            f"{run_dir} holds only {OVER_CAP_NAME}: its bytes_total exceeds "
            f"artifact_cap_bytes={config.artifact_cap_bytes} (see quant.json), so it is no valid "
            f"submission; for an experiment, re-quantize with a larger artifact_cap_bytes")
    raise FileNotFoundError(f"{artifact} not found; quantize first with "
                            f"`python -m parlm.quant --run-dir {run_dir}`")


class EvalRecord:
    """eval.json under construction: each scored phase adds `<name>_loss/_bpb/_seconds`, a log
    line and a metrics record; compile seconds are kept per phase."""

    def __init__(self, logger: RunLogger, out: dict):
        self.logger, self.out = logger, out
        self.compile_by_stage: dict[str, float] = {}

    def add(self, name: str, result: EvalResult, compile_seconds: float) -> None:
        out = self.out
        out[f"{name}_loss"], out[f"{name}_bpb"], out[f"{name}_seconds"] = result.loss, result.bpb, result.seconds
        self.compile_by_stage[name] = compile_seconds
        self.logger.log(f"{name} val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f} "
                        f"eval_time:{1000 * result.seconds:.0f}ms compile:{compile_seconds:.1f}s")
        self.logger.metric("eval", name=name, loss=result.loss, bpb=result.bpb, seconds=result.seconds,
                           compile_seconds=compile_seconds, tokens=result.tokens, bytes=result.bytes)


def build_tilt(config: Config, val_tokens: torch.Tensor, device, out: dict, logger):
    """The n-gram tilt (`parlm.eval.ngram_tilt`, #2130/#2135) when `tilt_enabled`, else None;
    its hint precompute time goes to out["tilt_precompute_seconds"] (inside the eval clock)."""
    if not config.tilt_enabled:
        return None
    tilt = NgramTilt(config, val_tokens, device)
    out["tilt_precompute_seconds"] = tilt.precompute_seconds
    out["tilt_fired_fraction"] = tilt.fired / max(tilt.total, 1)
    logger.log(f"tilt: precompute {tilt.precompute_seconds:.1f}s, fires at {tilt.fired} of {tilt.total} positions")
    return tilt


def run_ttt(config: Config, model, val_tokens, byte_tables, ctx, overlay, scorer):
    """Score-first TTT: per-document LoRA TTT (#1530) when `lora_ttt_enabled`, else the #1858
    chunk TTT; `overlay` (valid mixture or tilt) re-scores the same pass into `.mix`."""
    if config.lora_ttt_enabled:
        return eval_val_lora_ttt(config, model, val_tokens, byte_tables, ctx, tilt=overlay)
    return eval_val_ttt(config, model, val_tokens, byte_tables, ctx, mixture=overlay,
                        diagnostic_after=config.ttt_diagnostic_after, show_progress=True, scorer=scorer)


def record_ttt_frontier(out: dict, config: Config, ttt, tilt, logger) -> None:
    """eval.json fields of the frontier switches: ttt_method, the planner's measured costs
    (ttt_score_seconds/_batches, ttt_train_seconds/_sequences/_steps) and the tilted score
    (tilt_loss, tilt_bpb); eval_bpb is the headline (tilted when the tilt ran)."""
    out["ttt_method"] = "lora" if config.lora_ttt_enabled else "sgd"
    for key in ("score_seconds", "score_batches", "train_seconds", "train_sequences", "train_steps",
                "num_docs", "lora_steps", "global_steps", "global_seconds"):
        if key in ttt.extra:
            out[f"ttt_{key}"] = ttt.extra[key]
    out["eval_bpb"] = ttt.result.bpb
    if tilt is not None and ttt.mix is not None:
        out["tilt_loss"], out["tilt_bpb"] = ttt.mix.loss, ttt.mix.bpb
        out["eval_bpb"] = ttt.mix.bpb
        logger.log(f"tilt val_loss:{ttt.mix.loss:.8f} val_bpb:{ttt.mix.bpb:.8f}")
        logger.metric("eval", name="tilt", loss=ttt.mix.loss, bpb=ttt.mix.bpb)


def eval_clock(out: dict, config: Config) -> dict:
    """The evaluation clock as the contest counts it (compile warm-ups, which run on random or
    dummy tokens, logged apart as the late entries do): eval_clock_seconds = load + quantized
    + sliding + TTT (with any mixture/tilt scoring) + tilt precompute; the same plus compile;
    and the planner's projection onto the target machine (`parlm.eval.budget`)."""
    parts = ("load_seconds", "quantized_seconds", "sliding_seconds", "ttt_seconds", "tilt_precompute_seconds")
    clock = sum(out.get(key, 0.0) for key in parts)
    fields = {"eval_clock_seconds": clock, "eval_clock_with_compile_seconds": clock + out.get("compile_seconds", 0.0)}
    return {**fields, **projection_for_run({**out, **fields}, config)}


def score_sliding(config: Config, model, val_tokens, byte_tables, ctx, record: EvalRecord):
    """Sliding-window BPB (SPEC 5.2) into `record`; returns (per-position NLLs on rank 0, the
    compiled WindowScorer for TTT to reuse)."""
    total = val_tokens.numel() - 1
    # Per-position sliding NLLs: per-chunk comparison with TTT, and the NLL dump without TTT.
    buffer = torch.zeros(total + 1, dtype=torch.float32, device=ctx.device)
    scorer = WindowScorer(config, model, val_tokens, byte_tables, ctx.device)
    t0 = time.perf_counter()
    model.eval()
    scorer.warmup()
    compile_seconds = time.perf_counter() - t0
    record.add("sliding", eval_val_sliding(config, model, val_tokens, byte_tables, ctx, scorer=scorer,
                                           nll_out=buffer, show_progress=True), compile_seconds)
    return reduce_to_main(buffer, ctx), scorer


def score_ttt(config: Config, model, val_tokens, byte_tables, ctx, record: EvalRecord, scorer,
              sliding_nll, run_dir: Path) -> None:
    """Score-first TTT (SPEC 5.3: the #1858 chunk TTT, or per-document LoRA TTT when
    `lora_ttt_enabled`), with the valid mixture when `mixture_enabled` or the n-gram tilt when
    `tilt_enabled`, into `record`: its per-chunk numbers (with the sliding score of the same
    positions) or LoRA phases, the frontier fields and nll.npz."""
    total, out, logger = val_tokens.numel() - 1, record.out, record.logger
    mixture = None
    if config.mixture_enabled:
        # Imported here: the generated submission script does not carry the mixture module.
        from parlm.eval.token_mixture import TokenNgramMixture

        mixture = TokenNgramMixture(config, val_tokens, config.vocab_size, ctx.device)
    tilt = build_tilt(config, val_tokens, ctx.device, out, logger)
    ttt = run_ttt(config, model, val_tokens, byte_tables, ctx, mixture if tilt is None else tilt, scorer)
    record.add("ttt", ttt.result, ttt.extra["compile_seconds"])
    record_ttt_frontier(out, config, ttt, tilt, logger)
    out["ttt_num_chunks"] = ttt.extra["num_chunks"]
    out["ttt_diagnostic_after"] = bool(config.ttt_diagnostic_after)
    out["ttt_diagnostic_seconds"] = ttt.extra.get("diagnostic_seconds", 0.0)
    if mixture is not None:  # ttt_seconds includes the mixture; the neural part alone:
        out["ttt_mixture_seconds"] = ttt.extra["mixture_seconds"]
        out["ttt_neural_seconds"] = ttt.result.seconds - ttt.extra["mixture_seconds"]
    if sliding_nll is not None and ctx.is_main and not config.lora_ttt_enabled:
        add_sliding_to_chunks(ttt.chunks, sliding_nll[:total], val_tokens, byte_tables)
    # LoRA TTT has no stream chunks: its records are phases (ttt_phases), ttt_chunks stays empty.
    out["ttt_phases" if config.lora_ttt_enabled else "ttt_chunks"] = ttt.chunks
    out.setdefault("ttt_chunks", [])
    for chunk in ttt.chunks:
        logger.metric("eval", name="ttt_phase" if config.lora_ttt_enabled else "ttt_chunk", **chunk)
    if ttt.mix is not None and tilt is None:
        out["mix_valid_loss"], out["mix_valid_bpb"] = ttt.mix.loss, ttt.mix.bpb
        logger.log(f"mix_valid val_loss:{ttt.mix.loss:.8f} val_bpb:{ttt.mix.bpb:.8f}")
        logger.metric("eval", name="mix_valid", loss=ttt.mix.loss, bpb=ttt.mix.bpb)
    if ctx.is_main:
        write_nll(run_dir / "nll.npz", val_tokens, ttt.nll, ttt.nll_mix, source="ttt")


def evaluate_run(config: Config, run_dir) -> dict:
    """Evaluate a run folder's artifact: plain ("quantized", SPEC 5.1), sliding window
    (SPEC 5.2) and score-first TTT (SPEC 5.3) on the artifact weights, plus the valid mixture when
    `mixture_enabled`. Writes eval.json (BPB, loss, seconds per stage with compile time
    separate, per-chunk TTT numbers), nll.npz (rank 0) and metrics.jsonl records with stage
    "eval". Runs in one process or under torchrun; returns the eval.json dict."""
    run_dir = Path(run_dir)
    artifact = artifact_path(config, run_dir)
    verify_artifact(run_dir)  # the bytes quant.json recorded, else ArtifactError with the fix
    ctx = dist.init_distributed(config.device)
    device = ctx.device
    logger = RunLogger(run_dir, "eval.log")
    if (run_dir / "eval.json").exists():
        old = read_json(run_dir / "eval.json")
        logger.log(f"eval: replacing existing eval.json (ttt_bpb={old.get('ttt_bpb')}, "
                   f"sliding_bpb={old.get('sliding_bpb')})")
    logger.log(f"eval: world_size={ctx.world_size} device={device} compile={compile_enabled(config, device)}")
    val_tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    # one denominator for every scorer: SentencePiece tables, or the raw-text sidecar (CaseOps)
    byte_tables = byte_accounting(config, val_tokens.numel())
    total = val_tokens.numel() - 1
    record = EvalRecord(logger, {"world_size": ctx.world_size, "device": str(device), "tokens": total,
                                 "bytes": int(byte_tables.stream_bytes(val_tokens[:total + 1].numpy()))})
    out = record.out

    t0 = time.perf_counter()
    model = load_quantized_model(config, artifact, device)
    out["load_seconds"] = time.perf_counter() - t0
    plain_model, compile_seconds = compile_plain_model(config, model, total, ctx)
    record.add("quantized", eval_val(config, plain_model, val_tokens, byte_tables, ctx), compile_seconds)
    del plain_model
    reset_compiler(config, device)

    sliding_nll, scorer = None, None
    if config.sliding_window_enabled:
        sliding_nll, scorer = score_sliding(config, model, val_tokens, byte_tables, ctx, record)
    if config.ttt_enabled:
        score_ttt(config, model, val_tokens, byte_tables, ctx, record, scorer, sliding_nll, run_dir)
        reset_compiler(config, device)
    elif sliding_nll is not None and ctx.is_main:
        write_nll(run_dir / "nll.npz", val_tokens, sliding_nll[:total], None, source="sliding")

    out["compile_seconds"] = sum(record.compile_by_stage.values())
    out["compile_seconds_by_stage"] = record.compile_by_stage
    out.update(eval_clock(out, config))
    logger.log(f"eval clock: {out['eval_clock_seconds']:.1f}s here, projected "
               f"{out['eval_projection_seconds']:.1f}s on {out['eval_projection_target']} "
               f"(budget {config.eval_budget_seconds:.0f}s, speed ratio {config.eval_speed_ratio})")
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if ctx.is_main:
        write_json(run_dir / "eval.json", out)
    dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m parlm.eval --run-dir DIR [--config|--preset|--set] [--nproc N] [--nnodes ...]` (parlm.cli)."""
    return stage_command(
        "python -m parlm.eval",
        "Evaluate a run folder's quantized artifact: plain, sliding-window and score-first TTT "
        "BPB; writes eval.json and nll.npz (also under torchrun).",
        evaluate_run, argv, run_dir_help="run folder holding config.yaml and the artifact",
        user_errors=(ArtifactError,), distributed=True)
