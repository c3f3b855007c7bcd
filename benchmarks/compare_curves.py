"""Compare training-loss curves step by step: a run against a base run, next to a noise yardstick.

    python benchmarks/compare_curves.py BASE/metrics.jsonl OTHER/metrics.jsonl \
        [--noise SAME_SETUP_OTHER_SEED/metrics.jsonl] [--plot curves.png]

Used for the distributed check: BASE the 1-GPU run, OTHER the same settings on N GPUs, NOISE
the 1-GPU run with another seed; and for the fidelity check against the reference script: BASE
its training log (run with TRAIN_LOG_EVERY=1), OTHER and NOISE two parlm seeds. Each input is a
parlm metrics.jsonl or a text training log (the reference's, parlm's train.log, or a parlm.run
console log). Over the steps all runs logged, prints per phase (before /
after depth recurrence, as BASE logged it) the mean |Δ train_loss| and mean Δ of OTHER and of
NOISE against BASE, and the cumulative tok/s of each run at its last step before and after
looping, divided by its world size when the metrics carry one (train records do not: give it
with --other-world-size). "Within noise" means OTHER's mean |Δ| is no larger than NOISE's.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


TRAIN_LINE = re.compile(r"\b(\d+)/\d+ train_loss: (\S+) .*?tok/s: (\d+)")
LOOP_LINE = re.compile(r"layer_loop:enabled step:(\d+)")


def train_records(path: str | Path) -> dict[int, dict]:
    """step -> {train_loss, tok_per_sec, looping} for every logged training step.

    From a metrics.jsonl: its `stage == "train"` records that have a train_loss. From a text
    log: the lines `STEP/ITERATIONS train_loss: L ... tok/s: R` (the format the reference and
    parlm both log); looping is on for the steps after `layer_loop:enabled step:S` (S counts
    the steps already taken, so step S+1 is the first looped one)."""
    path = Path(path)
    records = {}
    if path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") == "train" and "train_loss" in record:
                records[int(record["step"])] = record
        return records
    looping_after = None
    for line in path.read_text(errors="replace").splitlines():
        loop = LOOP_LINE.search(line)
        if loop and looping_after is None:
            looping_after = int(loop.group(1))
        match = TRAIN_LINE.search(line)
        if match:
            step = int(match.group(1))
            records[step] = {"train_loss": float(match.group(2)), "tok_per_sec": float(match.group(3)),
                             "looping": looping_after is not None and step > looping_after}
    if not records:
        raise SystemExit(f"{path}: no training-loss lines (expected 'STEP/ITERATIONS train_loss: ...')")
    return records


def phase_differences(base: dict, other: dict, steps: list[int]) -> dict[str, dict]:
    """Per phase ("before_looping", "after_looping", "all"): steps, mean |Δ| and mean Δ of
    other.train_loss − base.train_loss over `steps` (phase from base's looping flag)."""
    out = {}
    looping = np.array([bool(base[s]["looping"]) for s in steps])
    delta = np.array([other[s]["train_loss"] - base[s]["train_loss"] for s in steps])
    for name, mask in (("before_looping", ~looping), ("after_looping", looping),
                       ("all", np.ones_like(looping))):
        if mask.any():
            out[name] = {"steps": int(mask.sum()), "mean_abs_delta": float(np.abs(delta[mask]).mean()),
                         "mean_delta": float(delta[mask].mean())}
    return out


def last_rates(records: dict, world_size: int) -> tuple[float | None, float | None]:
    """Cumulative tok/s per GPU at the last logged step before looping and at the last step."""
    before = [r for s, r in sorted(records.items()) if not r["looping"]]
    rate_before = before[-1]["tok_per_sec"] / world_size if before else None
    last = records[max(records)]
    rate_after = last["tok_per_sec"] / world_size if last["looping"] else None
    return rate_before, rate_after


def steady_rates(records: dict, batch_tokens: int, skip: int = 5) -> dict[str, float | None]:
    """Steady-state tok/s of each phase from a log's cumulative rates.

    A cumulative rate R_s = s * batch_tokens / T_s at step s gives the elapsed training time
    T_s = s * batch_tokens / R_s; over the steps [a, b] of one phase (its first `skip` steps
    left out: compiles, the looping switch) the steady rate is (b - a) * batch_tokens / (T_b - T_a).
    None for a phase with fewer than two steps left."""
    out = {}
    for name, looping in (("before_looping", False), ("after_looping", True)):
        steps = sorted(s for s, r in records.items() if bool(r["looping"]) == looping)[skip:]
        if len(steps) < 2:
            out[name] = None
            continue
        first, last = steps[0], steps[-1]
        elapsed = [step * batch_tokens / records[step]["tok_per_sec"] for step in (first, last)]
        out[name] = (last - first) * batch_tokens / (elapsed[1] - elapsed[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("other")
    parser.add_argument("--noise", help="metrics.jsonl of BASE's setup with another seed")
    parser.add_argument("--other-world-size", type=int, default=1)
    parser.add_argument("--plot", help="write an overlay of the curves here (PNG)")
    args = parser.parse_args()
    runs = {"base": train_records(args.base), "other": train_records(args.other)}
    if args.noise:
        runs["noise"] = train_records(args.noise)
    steps = sorted(set.intersection(*(set(r) for r in runs.values())))
    report = {"common_steps": len(steps), "last_step": {k: max(r) for k, r in runs.items()}}
    for name in ("other", "noise"):
        if name in runs:
            report[f"{name}_vs_base"] = phase_differences(runs["base"], runs[name], steps)
    for name, records in runs.items():
        world = args.other_world_size if name == "other" else 1
        before, after = last_rates(records, world)
        report[f"{name}_tok_per_sec_per_gpu"] = {"before_looping": before, "after_looping": after}
        report[f"{name}_looping_from_step"] = min((s for s, r in records.items() if r["looping"]), default=None)
    print(json.dumps(report, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(8, 4.5))
        labels = {"base": args.base, "other": args.other, "noise": args.noise}
        for name, records in runs.items():
            xs = sorted(records)
            axis.plot(xs, [records[s]["train_loss"] for s in xs], label=f"{name}: {labels[name]}", lw=1)
        axis.set_xlabel("step")
        axis.set_ylabel("train loss (nats/token)")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
