"""Plots of one seed's evaluation (eval.json, train.json): BPB per stage, per-chunk TTT BPB
before and after adaptation, cumulative TTT gain along the stream, time per stage. Each
function returns a matplotlib Figure (no pyplot state); `eval_figures` saves PNGs into
`<run_dir>/plots/`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from parlm import runlog

STAGES = (("prequant", "pre-quant (EMA)"), ("quantized", "quantized"), ("sliding", "sliding window"),
          ("ttt", "score-first TTT"), ("mix_valid", "TTT + valid mixture"))


def stage_bpb(evaluation: dict, train: dict | None = None) -> dict[str, float]:
    """{stage: BPB} for the stages present: prequant (train.json), quantized, sliding, ttt,
    mix_valid (eval.json)."""
    values = {}
    if train and train.get("prequant_bpb") is not None:
        values["prequant"] = float(train["prequant_bpb"])
    for stage, _ in STAGES[1:]:
        if evaluation.get(f"{stage}_bpb") is not None:
            values[stage] = float(evaluation[f"{stage}_bpb"])
    return values


def plot_stage_bpb(evaluation: dict, train: dict | None = None) -> Figure:
    """Bars of BPB per stage, annotated with the value and the change from the previous stage."""
    values = stage_bpb(evaluation, train)
    labels = dict(STAGES)
    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    names = list(values)
    heights = [values[n] for n in names]
    bars = ax.bar(range(len(names)), heights, color=["tab:gray", "tab:blue", "tab:orange", "tab:green",
                                                     "tab:purple"][-len(names):])
    for i, (bar, height) in enumerate(zip(bars, heights)):
        text = f"{height:.4f}" + (f"\n({height - heights[i - 1]:+.4f})" if i else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom", fontsize=8)
    low, high = min(heights), max(heights)
    pad = max(0.02, (high - low) * 0.6)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    ax.set_ylabel("validation BPB (bits/byte)")
    ax.set_title("BPB per evaluation stage")
    return fig


def plot_chunk_bpb(chunks: list[dict]) -> Figure:
    """Per-chunk BPB of the TTT pass as scored (before the chunk's update), the frozen model's
    sliding BPB on the same positions, and, when measured, the labelled after-update
    diagnostic (the chunk re-scored after training on it; not part of any score)."""
    fig = Figure(figsize=(8.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    index = np.array([c["chunk"] for c in chunks])
    ax.plot(index, [c["bpb"] for c in chunks], marker=".", color="tab:green",
            label="TTT, scored before update (the score)")
    if all("sliding_bpb" in c for c in chunks):
        ax.plot(index, [c["sliding_bpb"] for c in chunks], marker=".", color="tab:orange", alpha=0.8,
                label="sliding window, frozen model")
    after = [(c["chunk"], c["diagnostic_bpb_after_update"]) for c in chunks if "diagnostic_bpb_after_update" in c]
    if after:
        ax.plot(*zip(*after), marker="x", linestyle=":", color="tab:red",
                label="diagnostic: re-scored after its update (not scored)")
    ax.set_xlabel("TTT chunk (index along the validation stream)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # chunks are whole: no 0.5 ticks
    ax.set_ylabel("BPB of the chunk (bits/byte)")
    ax.set_title("Per-chunk BPB before and after adaptation")
    ax.legend(fontsize=8)
    return fig


def cumulative_gain(chunks: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk end positions, cumulative gain in BPB): after chunk k,
    Σ_{c≤k} (sliding_bits_c − ttt_bits_c) / Σ_{c≤k} bytes_c, with bits_c = bpb_c · bytes_c.
    Positive means TTT has saved bits so far."""
    ends = np.array([c["end"] for c in chunks], dtype=np.float64)
    nbytes = np.array([c["bytes"] for c in chunks], dtype=np.float64)
    saved = np.array([(c["sliding_bpb"] - c["bpb"]) * c["bytes"] for c in chunks], dtype=np.float64)
    return ends, np.cumsum(saved) / np.maximum(np.cumsum(nbytes), 1.0)


def plot_cumulative_gain(chunks: list[dict]) -> Figure:
    """Cumulative BPB gain of TTT over the frozen sliding-window model along the stream."""
    fig = Figure(figsize=(7.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    if chunks and all("sliding_bpb" in c for c in chunks):
        ends, gain = cumulative_gain(chunks)
        ax.plot(ends, gain, color="tab:green")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"Cumulative TTT gain over sliding window (final {gain[-1]:+.4f} BPB)")
    else:
        ax.set_title("Cumulative TTT gain (needs the sliding stage)")
    ax.set_xlabel("validation position (tokens)")
    ax.set_ylabel("sliding BPB − TTT BPB so far (bits/byte)")
    return fig


def plot_stage_times(evaluation: dict) -> Figure:
    """Stacked bars: scoring seconds and (separately measured) compile seconds per stage."""
    names = [n for n in ("quantized", "sliding", "ttt") if f"{n}_seconds" in evaluation]
    compile_by_stage = evaluation.get("compile_seconds_by_stage", {})
    scoring = [float(evaluation[f"{n}_seconds"]) for n in names]
    compiling = [float(compile_by_stage.get(n, 0.0)) for n in names]
    fig = Figure(figsize=(6.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(names, scoring, color="tab:blue", label="scoring")
    ax.bar(names, compiling, bottom=scoring, color="tab:gray", alpha=0.6, label="compile (warm-up)")
    for i, (s, c) in enumerate(zip(scoring, compiling)):
        ax.annotate(f"{s:.1f}s" + (f" + {c:.1f}s" if c >= 0.05 else ""), (i, s + c), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("time (seconds)")
    world = evaluation.get("world_size", 1)
    ax.set_title(f"Evaluation time per stage ({world} × {evaluation.get('device', '?')})")
    ax.legend(fontsize=8)
    return fig


def eval_figures(run_dir: str | os.PathLike, save: bool = True) -> dict[str, Figure]:
    """All evaluation figures of a run folder; saved as `<run_dir>/plots/eval_<name>.png`."""
    run_dir = Path(run_dir)
    evaluation = runlog.read_json(run_dir / "eval.json")
    train = runlog.read_json(run_dir / "train.json") if (run_dir / "train.json").exists() else None
    chunks = evaluation.get("ttt_chunks") or []
    figures = {"stage_bpb": plot_stage_bpb(evaluation, train), "stage_times": plot_stage_times(evaluation)}
    if chunks:
        figures["chunk_bpb"] = plot_chunk_bpb(chunks)
        figures["cumulative_gain"] = plot_cumulative_gain(chunks)
    if save:
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(run_dir / "plots" / f"eval_{name}.png", dpi=110)
    return figures


def stage_table(evaluation: dict, train: dict | None = None) -> list[tuple[str, float, float | None]]:
    """Rows (stage label, BPB, seconds or None) for printing."""
    rows = []
    for stage, value in stage_bpb(evaluation, train).items():
        seconds = (train or {}).get("prequant_seconds") if stage == "prequant" else evaluation.get(f"{stage}_seconds")
        rows.append((dict(STAGES)[stage], value, None if seconds is None or math.isnan(seconds) else seconds))
    return rows
