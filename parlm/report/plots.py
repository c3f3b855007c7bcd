"""Plots of the multi-seed report (matplotlib, no pyplot state: each function returns a Figure).

Figures are built on `matplotlib.figure.Figure` directly so they work under any backend
(headless runs, papermill, JupyterLab) and never pile up in pyplot's global figure list;
notebooks show them with `display(fig)`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from parlm.runlog import seed_dirs


STAGE_LABELS = {"prequant_bpb": "pre-quant\n(EMA)", "quantized_bpb": "quantized",
                "sliding_bpb": "sliding\nwindow", "ttt_bpb": "score-first\nTTT"}
# What each stage's change from the one before is called (the left panel's x labels).
STEP_NAMES = {"quantized_bpb": "quantization tax", "sliding_bpb": "sliding gain",
              "ttt_bpb": "TTT gain"}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def stage_deltas(summary: dict[str, Any]) -> dict[str, float]:
    """{stage: BPB(stage) - BPB(pre-quant)} for quantized, sliding and TTT (nan when a score is
    missing): the quantization tax, then the tax plus the sliding gain, then plus the TTT gain."""
    base = _number(summary.get("prequant_bpb"))
    return {stage: _number(summary.get(stage)) - base for stage in STEP_NAMES}


def bpb_by_stage(summaries: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = (),
                 baseline_label: str = "baseline") -> Figure:
    """Two panels. Left: each seed's change from its own pre-quant (EMA) BPB at each stage
    (`stage_deltas`: quantized = quantization tax; sliding, TTT = cumulative), one marker per
    seed over a bar at the mean with a whisker of +-1 sample std over the seeds, each bar
    labelled with the mean change and the step from the stage before; the baseline's seeds
    (if given) as grey crosses. Right: the absolute BPB at each stage, one line per seed. One
    legend below both panels names the seeds. The legacy PPM mixture is drawn in neither: it is
    not a valid BPB (SPEC 6.6)."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    delta_ax, bpb_ax = fig.subplots(1, 2, width_ratios=(1.15, 1))
    stages = list(STEP_NAMES)
    deltas = [stage_deltas(s) for s in summaries]
    for column, stage in enumerate(stages):
        values = np.array([d[stage] for d in deltas], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            centre = float(values.mean())
            spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            delta_ax.bar(column, centre, width=0.55, color="tab:gray", alpha=0.35,
                         yerr=spread, capsize=6, ecolor="k")
            step = centre - (float(np.nanmean([d[stages[column - 1]] for d in deltas]))
                             if column else 0.0)
            # Written along the top of the panel, clear of the markers and whiskers.
            delta_ax.annotate(f"mean {centre:+.5f}\nstep {step:+.5f}", (column, 0.98),
                              xycoords=delta_ax.get_xaxis_transform(), ha="center", va="top",
                              fontsize=8, bbox=dict(boxstyle="round", fc="white", alpha=0.8, lw=0))
    for index, (summary, delta) in enumerate(zip(summaries, deltas)):
        offset = (index - (len(summaries) - 1) / 2) * 0.08
        delta_ax.plot([c + offset for c in range(len(stages))], [delta[s] for s in stages],
                      marker="o", linestyle="-", linewidth=0.8, color=f"C{index % 10}",
                      label=f"seed {summary.get('seed')}")
    for summary in baseline:
        delta = stage_deltas(summary)
        delta_ax.plot(range(len(stages)), [delta[s] for s in stages], marker="x", linestyle="--",
                      color="grey", alpha=0.7, label=f"{baseline_label} seed {summary.get('seed')}")
    delta_ax.axhline(0.0, color="k", linewidth=0.8)
    delta_ax.set_xticks(range(len(stages)),
                        [f"{STAGE_LABELS[s]}\n(step: {STEP_NAMES[s]})" for s in stages])
    delta_ax.set_ylabel("BPB minus the seed's pre-quant BPB\n(bits/byte; below 0: better)")
    delta_ax.set_title("Change from pre-quant at each stage\n(bar: mean over seeds, whisker: ±1 std; "
                       "step: change from the stage before)", fontsize=10)
    low, high = delta_ax.get_ylim()
    delta_ax.set_ylim(low, high + 0.35 * (high - low))  # room for the notes along the top
    for summary in summaries:
        bpb_ax.plot(range(len(STAGE_LABELS)), [_number(summary.get(s)) for s in STAGE_LABELS],
                    marker="o", label=f"seed {summary.get('seed')}")
    for summary in baseline:
        bpb_ax.plot(range(len(STAGE_LABELS)), [_number(summary.get(s)) for s in STAGE_LABELS],
                    marker="x", linestyle="--", color="grey", alpha=0.7,
                    label=f"{baseline_label} seed {summary.get('seed')}")
    bpb_ax.set_xticks(range(len(STAGE_LABELS)), list(STAGE_LABELS.values()))
    bpb_ax.set_ylabel("validation BPB (bits/byte; lower is better)")
    bpb_ax.set_title("Absolute BPB by stage and seed\n(the gap between seeds dwarfs the stage "
                     "changes)", fontsize=10)
    for ax in (delta_ax, bpb_ax):
        ax.grid(alpha=0.3, axis="y")
    # One legend for both panels (the seeds' colours are the same), below them: inside, it would
    # cover the notes along the top of the left panel or a seed's line.
    handles, labels = bpb_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 6),
                   fontsize=8, frameon=False)
    return fig


def training_curves(run_dirs: Sequence[str | Path]) -> Figure:
    """Training loss and validation BPB against step, seeds overlaid (one colour per seed), from
    each seed's metrics.jsonl via `train_plots.training_curves`: the live model's validations
    joined by a line, the EMA (pre-quant) score as a star joined to the live score at the stop
    by a dotted line, the gap (EMA minus live, bits/byte) in the star's legend entry, and a
    dotted line where depth recurrence switched on. With `val_loss_every=0` each seed has only
    its scores at the stop, so each point is labelled with its value. A caption says why the
    stars sit above the live points (`ema_caption`)."""
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
            star_label = f"{label} EMA (pre-quant)"
            if val["step"]:
                # The gap the caption explains, in the legend: notes beside the stars of seeds
                # that stop at the same step would sit on top of each other.
                gap = prequant["val_bpb"][-1] - val["val_bpb"][-1]
                star_label += f": {gap:+.3f} vs live"
                val_ax.plot([prequant["step"][-1]] * 2, [val["val_bpb"][-1], prequant["val_bpb"][-1]],
                            linestyle=":", color=color, linewidth=1)
            val_ax.plot(prequant["step"], prequant["val_bpb"], marker="*", markersize=11,
                        linestyle="none", color=color, label=star_label)
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
    val_ax.set(xlabel="step", ylabel="validation BPB (bits/byte)",
               title="Validation BPB: live weights, and EMA weights at the stop")
    val_ax.margins(x=0.08)
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.supxlabel(ema_caption(_ema_decays(run_dirs)), fontsize=8, ha="center")
    return fig


def _ema_decays(run_dirs: Sequence[str | Path]) -> list[float]:
    from parlm.config import Config

    return sorted({Config.load(Path(d) / "config.yaml").ema_decay for d in run_dirs
                   if (Path(d) / "config.yaml").exists()})


def ema_caption(decays: Sequence[float]) -> str:
    """Why the EMA (pre-quant) score sits above the live one: the stars score the exponential
    moving average ema <- d*ema + (1-d)*theta taken after every step (SPEC 3.3, step 5), which
    averages over about 1/(1-d) recent steps and so lags weights that are still improving."""
    if decays:
        decay_text = " / ".join(f"{d:g}" for d in decays)
        window_text = " / ".join(f"{1 / (1 - d):.0f}" for d in decays if d < 1)
        span = f"d = ema_decay = {decay_text}: an average over the last ~{window_text} steps"
    else:
        span = "d = ema_decay: an average over the last ~1/(1-d) steps"
    return ("★ EMA (pre-quant): the score of the weights' moving average ema ← d·ema + (1−d)·θ after "
            f"every step ({span}), the model every later stage uses.\nIt lags weights that are "
            "still improving, so in a short run it scores above (worse than) the live model; as the "
            "LR warms down and the weights settle it catches up.")


def gate_summary(summaries: Sequence[dict[str, Any]]) -> Figure:
    """The legacy PPM mixture per seed: mix / NN-only / PPM-only BPB on its byte stream, and the
    anti-hijack gate's skip share (ppm.json gate_skip = skipped bytes / bytes, drawn in %).
    Labelled as not a valid BPB (SPEC 6.6); the legend sits below the seed names, clear of the
    bars, in the colours of parlm.ppm.plots' gate figures (NN blue, PPM green, mix red)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    bpb_ax, gate_ax = fig.subplots(1, 2)
    seeds = [str(s.get("seed")) for s in summaries]
    width = 0.27
    for offset, (key, label, color) in enumerate(
            (("nn_only_bpb", "NN only (p_tok^(1/n) per byte)", "tab:blue"),
             ("ppm_only_bpb", "PPM only", "tab:green"),
             ("mix_bpb_legacy", "legacy mix (NOT normalized)", "tab:red"))):
        values = [_number(s.get(key)) for s in summaries]
        positions = [i + (offset - 1) * width for i in range(len(seeds))]
        bars = bpb_ax.bar(positions, values, width, label=label, color=color)
        bpb_ax.bar_label(bars, fmt="%.3f", fontsize=7)
    bpb_ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    bpb_ax.set(ylabel="bits/byte (legacy accounting)",
               title="PPM byte mixture (not a valid BPB)")
    bpb_ax.margins(y=0.15)  # room for the bar labels
    # Below the seed names, where no bar can reach it.
    bpb_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3,
                  frameon=False)
    skips = [100 * _number(s.get("gate_skip")) for s in summaries]
    bars = gate_ax.bar(range(len(seeds)), skips, color="tab:purple", width=0.5)
    gate_ax.bar_label(bars, fmt="%.2f%%", fontsize=8)
    gate_ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    gate_ax.set(ylabel="bytes the gate hands to the NN alone (% of bytes)",
                title="Anti-hijack gate: bytes scored with λ = 1 (NN alone)")
    finite = [v for v in skips if math.isfinite(v)]
    gate_ax.set_ylim(0, max([1.0] + finite) * 1.2)  # bars start at 0 even when none fired
    for ax in (bpb_ax, gate_ax):
        ax.grid(alpha=0.3, axis="y")
    return fig


def save_figure(fig: Figure, path: str | Path) -> str:
    """Save a figure as PNG (parent folders created); return the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def gate_figures(run_dir: str | Path) -> dict[str, Figure]:
    """The PPM gate's figures of one seed (parlm.ppm.plots, from its ppm_trace.npz and
    ppm.json): `gate_decision` (the gate's choice against the NN's per-token confidence, the
    threshold drawn), `gate_lambda_along_stream` (the mixture weight over the stream) and
    `gate_bpb_contribution` (the BPB of gated and ungated bytes); {} without a trace."""
    from parlm.ppm import plots as ppm_plots
    from parlm.ppm.stage import load_traces
    from parlm.runlog import read_json

    run_dir = Path(run_dir)
    if not (run_dir / "ppm_trace.npz").exists():
        return {}
    traces = load_traces(run_dir / "ppm_trace.npz")
    settings = read_json(run_dir / "ppm.json") if (run_dir / "ppm.json").exists() else {}
    seed = run_dir.name.replace("_", " ")
    figures = {"gate_decision": ppm_plots.gate_decision_by_confidence(
                   traces, settings.get("anti_hijack_nats", 0.277)),
               "gate_lambda_along_stream": ppm_plots.lambda_along_stream(traces),
               "gate_bpb_contribution": ppm_plots.gate_bpb_contribution(traces)}
    for figure in figures.values():
        figure.suptitle(f"{seed}: {figure.get_suptitle()}", fontsize=10)
    return figures


def save_report_plots(run_root: str | Path, summaries: Sequence[dict[str, Any]],
                      out_dir: str | Path, baseline: Sequence[dict[str, Any]] = (),
                      baseline_label: str = "baseline") -> dict[str, str]:
    """Write the report figures into `out_dir` (bpb_by_stage, training_curves, gate_summary,
    and the first seed's `gate_figures`); return {name: png path}."""
    out_dir = Path(out_dir)
    paths = {
        "bpb_by_stage": save_figure(bpb_by_stage(summaries, baseline, baseline_label),
                                    out_dir / "bpb_by_stage.png"),
        "training_curves": save_figure(training_curves(seed_dirs(run_root)),
                                       out_dir / "training_curves.png"),
        "gate_summary": save_figure(gate_summary(summaries), out_dir / "gate_summary.png"),
    }
    folders = seed_dirs(run_root)
    for name, figure in (gate_figures(folders[0]) if folders else {}).items():
        paths[name] = save_figure(figure, out_dir / f"{name}.png")
    return paths
