"""Evaluation-budget planner: project a run's measured evaluation time onto the contest's
machine (8xH100, 600 s) and pick the #1858 TTT chunk size and epochs that fit.

Costs are measured on this GPU from eval.json (one rank's view, world size w_m) and scaled by
s = `eval_speed_ratio` (measured GPU speed / H100 speed, so H100 seconds = measured · s):

    t_window = ttt_score_seconds / (score batches · B)        (one scored window, padded batches)
    t_seq    = ttt_train_seconds / ttt_train_sequences          (one L-token fwd+bwd+step share)

On W target GPUs, for chunk size C and E epochs over T positions (num_chunks = ⌈T/C⌉, n_c the
windows of chunk c from `plan_ttt_chunks`, seqs_c = ⌊(chunk length)/L⌋):

    score(C)    = s · t_window · B · Σ_c ⌈⌈n_c/W⌉ / B⌉
    train(C, E) = s · E · Σ_{c < num_chunks−1} (t_seq · ⌈seqs_c / W⌉ + t_step)
    fixed       = s · (load + tilt precompute + (quantized + sliding + LoRA TTT) · w_m / W)

load and the tilt precompute run whole on every rank; plain, sliding and LoRA TTT split their
work across ranks. t_step is a fixed cost per synchronous step (optimizer, all-reduce
latency, launches) that one measurement cannot separate from t_seq: an explicit input
(`--step-overhead`, default 0), the term that makes very small chunks expensive. projection = fixed + score + train; it fits when
projection ≤ budget · (1 − margin). `plan` keeps the smallest chunk that fits, with the most
epochs for it. The speed ratio is an explicit input because it cannot be measured here.

    python -m parlm.eval.budget --eval-json runs/R/seed_42/eval.json --speed-ratio 1.15
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, asdict

import numpy as np

from parlm.eval.scoring import plan_ttt_chunks


@dataclass
class Target:
    """The machine to project onto: GPUs, the evaluation cap, the kept-free fraction, and the
    measured GPU's speed relative to one target GPU."""

    world_size: int = 8
    budget_seconds: float = 600.0
    margin: float = 0.10
    speed_ratio: float = 1.0

    @property
    def allowed_seconds(self) -> float:
        return self.budget_seconds * (1.0 - self.margin)


@dataclass
class MeasuredCosts:
    """Per-unit seconds on the measured GPU (module docstring) and the stream's shape."""

    window_seconds: float
    sequence_seconds: float
    fixed_seconds: float  # load + tilt precompute, not split across ranks
    shared_seconds: float  # plain + sliding + LoRA TTT, measured on `measured_world_size` ranks
    measured_world_size: int
    total_tokens: int
    seq_len: int
    stride: int
    batch_seqs: int
    step_overhead_seconds: float = 0.0  # t_step: fixed seconds per synchronous TTT step


def measured_costs(eval_json: dict, config) -> MeasuredCosts:
    """MeasuredCosts from an eval.json written by `evaluate_run` (keys ttt_score_seconds,
    ttt_score_batches, ttt_train_seconds, ttt_train_sequences, load_seconds, ...)."""
    batches = max(eval_json.get("ttt_score_batches", 0), 1) * config.eval_batch_seqs
    sequences = max(eval_json.get("ttt_train_sequences", 0), 1)
    shared = sum(eval_json.get(key, 0.0) for key in ("quantized_seconds", "sliding_seconds"))
    if eval_json.get("ttt_method") == "lora":
        shared += eval_json.get("ttt_seconds", 0.0)
    return MeasuredCosts(
        window_seconds=eval_json.get("ttt_score_seconds", 0.0) / batches,
        sequence_seconds=eval_json.get("ttt_train_seconds", 0.0) / sequences,
        fixed_seconds=eval_json.get("load_seconds", 0.0) + eval_json.get("tilt_precompute_seconds", 0.0),
        shared_seconds=shared, measured_world_size=int(eval_json.get("world_size", 1)),
        total_tokens=int(eval_json["tokens"]), seq_len=config.eval_seq_len, stride=config.eval_stride,
        batch_seqs=config.eval_batch_seqs)


def project(costs: MeasuredCosts, target: Target, chunk_tokens: int, epochs: int,
            chunk_ttt: bool = True) -> dict:
    """Projected target seconds {fixed, score, train, total, fits} for chunk size C and E
    epochs (formulas in the module docstring); score = train = 0 without the chunk TTT."""
    s, W = target.speed_ratio, target.world_size
    fixed = s * (costs.fixed_seconds + costs.shared_seconds * costs.measured_world_size / W)
    score = train = 0.0
    if chunk_ttt:
        bounds = plan_ttt_chunks(costs.total_tokens, costs.seq_len, costs.stride, chunk_tokens)
        windows = np.diff(bounds)
        per_rank = -(-windows // W)
        score = s * costs.window_seconds * costs.batch_seqs * float((-(-per_rank // costs.batch_seqs)).sum())
        starts = np.arange(len(windows)) * chunk_tokens
        lengths = np.minimum(starts + chunk_tokens, costs.total_tokens) - starts
        seqs = lengths[:-1] // costs.seq_len
        train = s * epochs * float((costs.sequence_seconds * -(-seqs // W) + costs.step_overhead_seconds).sum())
    total = fixed + score + train
    return {"chunk_tokens": chunk_tokens, "epochs": epochs, "fixed_seconds": fixed,
            "score_seconds": score, "train_seconds": train, "total_seconds": total,
            "fits": total <= target.allowed_seconds}


def plan(costs: MeasuredCosts, target: Target, chunk_candidates: list[int],
         epoch_candidates: list[int]) -> tuple[dict | None, list[dict]]:
    """(choice, table): every (C, E) projected; the choice is the smallest C that fits with
    the most E for it, None when nothing fits. Candidates must be multiples of the stride."""
    table = [project(costs, target, c, e) for c in sorted(chunk_candidates) for e in sorted(epoch_candidates)]
    fitting = [row for row in table if row["fits"]]
    if not fitting:
        return None, table
    smallest = min(row["chunk_tokens"] for row in fitting)
    return max((r for r in fitting if r["chunk_tokens"] == smallest), key=lambda r: r["epochs"]), table


def projection_for_run(eval_json: dict, config) -> dict:
    """The eval.json projection fields of a finished evaluation: the current configuration's
    projected target seconds, the target, and whether it fits (with and without the margin)."""
    target = Target(config.eval_budget_world_size, config.eval_budget_seconds,
                    config.eval_budget_margin, config.eval_speed_ratio)
    costs = measured_costs(eval_json, config)
    chunk_ttt = eval_json.get("ttt_method") == "sgd"
    row = project(costs, target, config.ttt_chunk_tokens, config.ttt_epochs, chunk_ttt=chunk_ttt)
    return {"eval_projection_seconds": row["total_seconds"],
            "eval_projection_target": f"{target.world_size}xH100",
            "eval_projection_budget_seconds": target.budget_seconds,
            "eval_projection_margin": target.margin, "eval_speed_ratio": target.speed_ratio,
            "eval_projection_fits_margin": row["fits"],
            "eval_projection_over_budget": row["total_seconds"] > target.budget_seconds}


def main(argv: list[str] | None = None) -> None:
    from parlm.config import Config

    parser = argparse.ArgumentParser(prog="python -m parlm.eval.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-json", required=True, help="eval.json of a run measured on this GPU")
    parser.add_argument("--config", default="", help="config.yaml (default: beside eval.json)")
    parser.add_argument("--speed-ratio", type=float, required=True,
                        help="measured GPU speed / H100 speed (H100 seconds = measured x ratio)")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--chunks", default="", help="comma-separated chunk sizes (default: 1/4x..2x current)")
    parser.add_argument("--epochs", default="1,2,3,4")
    parser.add_argument("--step-overhead", type=float, default=0.0,
                        help="fixed seconds per TTT step on the measured GPU (t_step)")
    args = parser.parse_args(argv)
    from pathlib import Path

    eval_path = Path(args.eval_json)
    config = Config.load(Path(args.config) if args.config else eval_path.parent / "config.yaml")
    eval_json = json.loads(eval_path.read_text())
    costs = measured_costs(eval_json, config)
    costs.step_overhead_seconds = args.step_overhead
    target = Target(args.world_size, args.budget, args.margin, args.speed_ratio)
    step = math.lcm(config.eval_stride, config.eval_seq_len)
    chunks = ([int(c) for c in args.chunks.split(",")] if args.chunks else
              sorted({max(step, config.ttt_chunk_tokens * k // 4 // step * step) for k in (1, 2, 3, 4, 6, 8)}))
    choice, table = plan(costs, target, chunks, [int(e) for e in args.epochs.split(",")])
    print(f"measured costs: {json.dumps(asdict(costs))}")
    print(f"target {target.world_size}xH100, budget {target.budget_seconds:.0f} s, margin "
          f"{target.margin:.0%} -> allowed {target.allowed_seconds:.1f} s, speed ratio {target.speed_ratio}")
    print(f"{'chunk':>8} {'epochs':>6} {'fixed s':>9} {'score s':>9} {'train s':>9} {'total s':>9} fits")
    for row in table:
        print(f"{row['chunk_tokens']:>8} {row['epochs']:>6} {row['fixed_seconds']:>9.1f} {row['score_seconds']:>9.1f} "
              f"{row['train_seconds']:>9.1f} {row['total_seconds']:>9.1f} {'yes' if row['fits'] else 'no'}")
    print("choice: " + (f"ttt_chunk_tokens={choice['chunk_tokens']} ttt_epochs={choice['epochs']} "
                        f"({choice['total_seconds']:.1f} s)" if choice else "nothing fits"))


if __name__ == "__main__":
    main()
