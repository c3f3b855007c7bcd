"""Plots of the PPM stage from `ppm_trace.npz` / `ppm.json` (each returns a Figure).

Built on `matplotlib.figure.Figure` (no pyplot state) like `parlm.report.plots`. Every panel about
the legacy mixture says it is not a normalized distribution (SPEC 6.6).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from parlm.runlog import read_json
from parlm.ppm.stage import load_traces

CHOICE_LABELS = ("λ = lambda_lo (trust PPM)", "λ = lambda_hi (trust NN)", "gate skip (λ = 1)")
CHOICE_COLORS = ("tab:green", "tab:blue", "tab:red")
LEGACY = "legacy mixture (NOT normalized)"


def lambda_along_stream(traces: dict, window: int = 2000) -> Figure:
    """Share of each gate choice in a sliding window of traced bytes, along the stream."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot()
    choice = traces["trace_lambda_choice"]
    index = traces["trace_byte_index"]
    window = max(1, min(window, len(choice) // 10 or 1))
    kernel = np.ones(window) / window
    for value in range(3):
        share = np.convolve((choice == value).astype(float), kernel, mode="valid")
        ax.plot(index[window - 1:], share, label=CHOICE_LABELS[value], color=CHOICE_COLORS[value], lw=1)
    ax.set_xlabel("byte index in the stream")
    ax.set_ylabel(f"share (window of {window} traced bytes)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Gate choice along the stream — {LEGACY}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def confidence_histogram(traces: dict, threshold: float = 0.9) -> Figure:
    """Histogram (exact, all bytes) of the PPM confidence max_count/(n+u) that drives λ."""
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    hist = traces["confidence_histogram"]
    edges = np.linspace(0, 1, len(hist) + 1)
    ax.bar(edges[:-1], hist / max(hist.sum(), 1), width=np.diff(edges), align="edge", color="tab:gray")
    ax.axvline(threshold, color="tab:red", ls="--", label=f"conf_threshold = {threshold}")
    ax.set_xlabel("confidence = max_count / (n + u) at the highest existing context")
    ax.set_ylabel("fraction of bytes")
    ax.set_title("PPM confidence")
    ax.legend(fontsize=8)
    return fig


def gate_skip_by_position_and_frequency(traces: dict) -> Figure:
    """Gate-skip rate by byte position within the token, and by the token's frequency."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    stats = traces["position_stats"].astype(float)
    bytes_at = stats.sum(1)
    shown = np.flatnonzero(bytes_at > 0)
    left.bar(shown, stats[shown, 2] / bytes_at[shown], color="tab:red")
    for position in shown:
        left.annotate(f"{int(bytes_at[position]):,}", (position, stats[position, 2] / bytes_at[position]),
                      fontsize=6, ha="center", va="bottom", rotation=90)
    left.set_xlabel("byte position within its token (last bar: 31 and beyond)")
    left.set_ylabel("gate-skip rate (numbers: bytes)")
    left.set_title("Anti-hijack skips by position in token")
    token_stats = traces["token_stats"].astype(float)
    frequency = traces["token_frequency"].astype(float)
    frequency = np.pad(frequency, (0, max(0, len(token_stats) - len(frequency))))[:len(token_stats)]
    seen = frequency > 0
    if seen.any():
        edges = np.unique(np.logspace(0, math.log10(frequency[seen].max() + 1), 12).astype(int))
        bucket = np.digitize(frequency[seen], edges)
        rates, centers = [], []
        for b in np.unique(bucket):
            sel = bucket == b
            total = token_stats[seen][sel].sum()
            if total > 0:
                rates.append(token_stats[seen][sel][:, 2].sum() / total)
                centers.append(np.exp(np.log(frequency[seen][sel]).mean()))
        right.plot(centers, rates, marker="o", color="tab:red")
    right.set_xscale("log")
    right.set_xlabel("token frequency in the scored stream (log)")
    right.set_ylabel("gate-skip rate of its bytes")
    right.set_title("Skips by token frequency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def cumulative_bpb(traces: dict, summary: dict | None = None) -> Figure:
    """Cumulative BPB of NN-only (per-byte spread), PPM-only and the legacy mixture."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    curve = traces["curve"]
    if len(curve):
        scale = curve[:, 0] * math.log(2)
        ax.plot(curve[:, 0], curve[:, 3] / scale, label="NN only (p_tok^(1/n) per byte)", color="tab:blue")
        ax.plot(curve[:, 0], curve[:, 2] / scale, label="PPM only (method C, no exclusion)", color="tab:green")
        ax.plot(curve[:, 0], curve[:, 1] / scale, label=LEGACY, color="tab:red")
    if summary and summary.get("neural_bpb_same_positions"):
        ax.axhline(summary["neural_bpb_same_positions"], color="k", ls=":", lw=1,
                   label="neural BPB, same positions (valid)")
    ax.set_xlabel("bytes scored")
    ax.set_ylabel("cumulative bits per byte")
    ax.set_title("Cumulative BPB along the stream")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def audit_histogram(traces: dict) -> Figure:
    """Implied total probability of the legacy mixture at the audited positions (1 = valid)."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.add_subplot()
    series = [("audit_token_total", "token level: Σ_v Π_bytes mix", "tab:red"),
              ("audit_constant_total", "byte level as implemented: p^(1/n) for all 256 bytes", "tab:brown"),
              ("audit_first_total", "byte level, first-byte NN extension", "tab:orange"),
              ("audit_nn_first_total", "NN alone: Σ_b Σ_v p(v)^(1/n)", "tab:purple"),
              ("audit_ppm_total", "legacy PPM alone (no exclusion)", "tab:green"),
              ("audit_ppmd_total", "PPM-D with exclusion (valid)", "tab:blue")]
    values = [traces[k] for k, _, _ in series if k in traces and len(traces[k])]
    if values:
        lo = max(min(v.min() for v in values), 1e-3)
        hi = max(v.max() for v in values)
        edges = np.logspace(math.log10(lo) - 0.05, math.log10(hi) + 0.05, 40)
        for key, label, color in series:
            if key in traces and len(traces[key]):
                ax.hist(traces[key], bins=edges, alpha=0.55, label=f"{label} (median {np.median(traces[key]):.3g})",
                        color=color)
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("total probability implied over all candidates (log; a distribution gives 1)")
    ax.set_ylabel("audited positions")
    neural = str(traces.get("audit_neural", "spread"))
    ax.set_title(f"Normalization audit ({neural} NN log-probs)")
    ax.legend(fontsize=7)
    return fig


def valid_mixture_vs_neural(summary: dict, evaluation: dict | None = None) -> Figure:
    """Valid token mixture vs neural-only BPB (eval.json), beside the legacy numbers (hatched:
    not a valid BPB)."""
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    evaluation = evaluation or {}
    bars = [("neural (TTT)", evaluation.get("ttt_bpb", summary.get("eval_ttt_bpb")), "tab:blue", None),
            ("valid token mixture", evaluation.get("mix_valid_bpb", summary.get("eval_mix_valid_bpb")),
             "tab:green", None),
            ("legacy nn_only", summary.get("nn_only_bpb"), "lightgray", "//"),
            ("legacy mix\n(NOT normalized)", summary.get("mix_bpb"), "tab:red", "//")]
    bars = [b for b in bars if b[1] is not None]
    for x, (label, value, color, hatch) in enumerate(bars):
        ax.bar(x, value, color=color, hatch=hatch, edgecolor="k")
        ax.annotate(f"{value:.4f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("bits per byte")
    ax.set_title("Valid mixture vs neural (solid) and the legacy numbers (hatched)")
    return fig


def ppm_figures(run_dir) -> dict[str, Figure]:
    """Every PPM figure of a run folder, saved as `<run_dir>/plots/ppm_<name>.png`."""
    run_dir = Path(run_dir)
    traces = load_traces(run_dir / "ppm_trace.npz")
    summary = read_json(run_dir / "ppm.json")
    evaluation = read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else None
    figures = {
        "lambda_along_stream": lambda_along_stream(traces),
        "confidence_histogram": confidence_histogram(traces, summary.get("conf_threshold", 0.9)),
        "gate_skip": gate_skip_by_position_and_frequency(traces),
        "cumulative_bpb": cumulative_bpb(traces, summary),
        "audit_histogram": audit_histogram(traces),
        "valid_mixture": valid_mixture_vs_neural(summary, evaluation),
    }
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(run_dir / "plots" / f"ppm_{name}.png", dpi=110)
    return figures
