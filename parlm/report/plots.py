"""Plots of the multi-seed report (matplotlib, no pyplot state: each function returns a Figure).

Figures are built on `matplotlib.figure.Figure` directly so they work under any backend
(headless runs, papermill, JupyterLab) and never pile up in pyplot's global figure list;
notebooks show them with `display(fig)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from parlm.runlog import seed_dirs


STAGE_LABELS = {"prequant_bpb": "pre-quant\n(EMA)", "quantized_bpb": "quantized",
                "sliding_bpb": "sliding\nwindow", "ttt_bpb": "score-first\nTTT"}


def bpb_by_stage(summaries: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = (),
                 baseline_label: str = "baseline") -> Figure:
    """BPB at each valid stage (pre-quant, quantized, sliding, TTT), one line per seed; the
    baseline's seeds (if given) dashed. The legacy PPM mixture is not drawn here: it is not a
    valid BPB (SPEC 6.6) and has its own panel in `gate_summary`."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    stages = list(STAGE_LABELS)
    positions = range(len(stages))
    for summary in summaries:
        values = [summary.get(s) for s in stages]
        ax.plot(positions, [v if v is not None else float("nan") for v in values], marker="o",
                label=f"seed {summary.get('seed')}")
    for summary in baseline:
        values = [summary.get(s) for s in stages]
        ax.plot(positions, [v if v is not None else float("nan") for v in values], marker="x",
                linestyle="--", color="grey", alpha=0.7,
                label=f"{baseline_label} seed {summary.get('seed')}")
    ax.set_xticks(list(positions), [STAGE_LABELS[s] for s in stages])
    ax.set_ylabel("bits per byte")
    ax.set_title("Validation BPB by stage and seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def training_curves(run_dirs: Sequence[str | Path]) -> Figure:
    """Training loss and validation BPB against step, seeds overlaid (one colour per seed), from
    each seed's metrics.jsonl via `train_plots.training_curves`: the live model's validations
    joined by a line, the EMA (pre-quant) score as a star, and a dotted line where depth
    recurrence switched on. With `val_loss_every=0` each seed has only its scores at the stop,
    so each point is labelled with its value."""
    from matplotlib.ticker import MaxNLocator

    from parlm.train.plots import training_curves as run_curves

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    for index, run_dir in enumerate(run_dirs):
        color = f"C{index % 10}"
        label = Path(run_dir).name.replace("_", " ")
        curves = run_curves(run_dir)
        train, val, prequant = curves["train"], curves["val"], curves["prequant"]
        if train["step"]:
            loss_ax.plot(train["step"], train["train_loss"], color=color, label=label, linewidth=1)
        if val["step"]:
            val_ax.plot(val["step"], val["val_bpb"], marker="o", color=color, label=f"{label} live")
        if prequant["step"]:
            val_ax.plot(prequant["step"], prequant["val_bpb"], marker="*", markersize=11,
                        linestyle="none", color=color, label=f"{label} EMA (pre-quant)")
        if len(val["step"]) <= 1:
            for step, bpb in zip(val["step"] + prequant["step"], val["val_bpb"] + prequant["val_bpb"]):
                val_ax.annotate(f"{bpb:.4f}", (step, bpb), textcoords="offset points", xytext=(6, 0),
                                va="center", fontsize=8, color=color)
            val_ax.margins(x=0.2)
        if curves["looping_step"] is not None:
            loss_ax.axvline(curves["looping_step"], color=color, linestyle=":", linewidth=1)
    if loss_ax.get_lines():
        loss_ax.annotate("dotted: looping on", (0.99, 0.97), xycoords="axes fraction", ha="right",
                         va="top", fontsize=8, color="gray")
    loss_ax.set(xlabel="step", ylabel="train loss (nats/token)", title="Training loss")
    val_ax.set(xlabel="step", ylabel="val BPB", title="Validation during training and at the stop")
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def gate_summary(summaries: Sequence[dict[str, Any]]) -> Figure:
    """The legacy PPM mixture per seed: mix / NN-only / PPM-only BPB on its byte stream, and the
    anti-hijack gate's skip fraction. Labelled as not a valid BPB (SPEC 6.6)."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    bpb_ax, gate_ax = fig.subplots(1, 2)
    seeds = [str(s.get("seed")) for s in summaries]
    width = 0.27
    for offset, (key, label) in enumerate((("nn_only_bpb", "NN only"),
                                           ("ppm_only_bpb", "PPM only"),
                                           ("mix_bpb_legacy", "legacy mix"))):
        values = [s.get(key) if s.get(key) is not None else float("nan") for s in summaries]
        bpb_ax.bar([i + (offset - 1) * width for i in range(len(seeds))], values, width,
                   label=label)
    bpb_ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    bpb_ax.set(ylabel="bits per byte (legacy accounting)",
               title="PPM byte mixture (not a valid BPB)")
    bpb_ax.legend(fontsize=8)
    skips = [s.get("gate_skip") if s.get("gate_skip") is not None else float("nan")
             for s in summaries]
    gate_ax.bar(range(len(seeds)), skips, color="tab:purple")
    gate_ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    gate_ax.set(ylabel="gate_skip (as ppm.json reports it)",
                title="Anti-hijack gate: PPM suppressed")
    for ax in (bpb_ax, gate_ax):
        ax.grid(alpha=0.3, axis="y")
    return fig


def save_figure(fig: Figure, path: str | Path) -> str:
    """Save a figure as PNG (parent folders created); return the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def save_report_plots(run_root: str | Path, summaries: Sequence[dict[str, Any]],
                      out_dir: str | Path, baseline: Sequence[dict[str, Any]] = (),
                      baseline_label: str = "baseline") -> dict[str, str]:
    """Write the three report figures into `out_dir`; return {name: png path}."""
    out_dir = Path(out_dir)
    return {
        "bpb_by_stage": save_figure(bpb_by_stage(summaries, baseline, baseline_label),
                                    out_dir / "bpb_by_stage.png"),
        "training_curves": save_figure(training_curves(seed_dirs(run_root)),
                                       out_dir / "training_curves.png"),
        "gate_summary": save_figure(gate_summary(summaries), out_dir / "gate_summary.png"),
    }
