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

# trace_lambda_choice values: 0 = lambda_lo (PPM confident), 1 = lambda_hi, 2 = gate skip (λ = 1).
CHOICE_LABELS = ("ungated: λ = lambda_lo (trust PPM)", "ungated: λ = lambda_hi (trust NN)",
                 "gated: skip, λ = 1 (NN alone)")
CHOICE_COLORS = ("tab:green", "tab:blue", "tab:red")
LEGACY = "legacy mixture (NOT normalized)"


def _window(length: int, window: int) -> int:
    return max(1, min(window, length // 10 or 1))


def choice_labels(traces: dict) -> tuple[str, ...]:
    """CHOICE_LABELS with each λ name replaced by the value the traced bytes of that choice
    carry (trace_lambda), so a legend reads "λ = 0.05" rather than "λ = lambda_lo"."""
    choice, weight = traces["trace_lambda_choice"], traces["trace_lambda"]
    labels = list(CHOICE_LABELS)
    for value, name in ((0, "lambda_lo"), (1, "lambda_hi")):
        if np.any(choice == value):
            labels[value] = labels[value].replace(name, f"{float(weight[choice == value][0]):g}")
    return tuple(labels)


def lambda_along_stream(traces: dict, window: int = 2000) -> Figure:
    """The mixture weight over the stream. Top: λ (the NN's weight in
    p_mix = λ p_NN + (1-λ) p_PPM) per traced byte, averaged over a sliding window. Bottom: the
    share (%) of the bytes in the same window that the gate skips (λ = 1) and that trust the
    PPM (λ = lambda_lo), on their own scale: the rest, usually most bytes, are λ = lambda_hi."""
    fig = Figure(figsize=(9, 5.2), layout="constrained")
    weight_ax, share_ax = fig.subplots(2, 1, sharex=True)
    choice = traces["trace_lambda_choice"]
    index = traces["trace_byte_index"]
    labels = choice_labels(traces)
    window = _window(len(choice), window)
    kernel = np.ones(window) / window
    if len(choice):
        weight = np.convolve(traces["trace_lambda"].astype(float), kernel, mode="valid")
        weight_ax.plot(index[window - 1:], weight, color="k", lw=1)
        weight_ax.axhline(float(traces["trace_lambda"].mean()), color="tab:orange", ls="--", lw=1,
                          label=f"mean over the stream {float(traces['trace_lambda'].mean()):.3f}")
        weight_ax.legend(fontsize=8, loc="lower right")
        for value in (0, 2):  # lambda_hi's share is 100% minus these two
            share = np.convolve((choice == value).astype(float), kernel, mode="valid")
            share_ax.plot(index[window - 1:], 100 * share, color=CHOICE_COLORS[value], lw=1,
                          label=f"{labels[value]}: {100 * float(np.mean(choice == value)):.2f}% "
                                f"of the stream")
        share_ax.annotate(f"the rest ({100 * float(np.mean(choice == 1)):.1f}% of the stream): "
                          f"{labels[1]}", (0.01, 0.97), xycoords="axes fraction", va="top",
                          fontsize=8, color=CHOICE_COLORS[1])
        share_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.88), frameon=False)
    weight_ax.set_ylabel("λ on the NN (fraction,\nwindow mean)")
    weight_ax.set_ylim(0, 1.02)
    fig.suptitle(f"Mixture weight along the stream (window of {window:,} traced bytes) — {LEGACY}",
                 fontsize=11)
    share_ax.set_xlabel("position in the scored byte stream (bytes)")
    share_ax.set_ylabel("share of the window's\nbytes (%)")
    share_ax.set_ylim(0, max(1.0, share_ax.get_ylim()[1]) * 1.6)  # room for the notes on top
    for ax in (weight_ax, share_ax):
        ax.grid(alpha=0.3)
    return fig


def surprisal_bits(traces: dict) -> np.ndarray:
    """The NN's surprisal of each traced byte in bits, -ℓ/ln 2, where ℓ = log p_tok / n is the
    realised token's log-probability spread over its n bytes (what the anti-hijack gate reads):
    one value per token, shared by all of its bytes."""
    return -traces["trace_nn_logp"].astype(float) / math.log(2)


def gate_decision_by_confidence(traces: dict, anti_hijack_nats: float = 0.277) -> Figure:
    """The gate's decision against the NN's per-token confidence, spread per byte as the gate
    reads it (`surprisal_bits`: -log2 p_tok / n). Top: among the traced bytes of each surprisal
    bin, the share of each gate choice (%); the anti-hijack threshold anti_hijack_nats/ln 2 bits
    is drawn: below it every byte is a skip (λ = 1). Bottom: how the traced bytes spread over the
    bins (% of bytes)."""
    fig = Figure(figsize=(9, 5.6), layout="constrained")
    share_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1.3, 1))
    surprisal = surprisal_bits(traces)
    choice = traces["trace_lambda_choice"]
    labels = choice_labels(traces)
    threshold = anti_hijack_nats / math.log(2)
    if len(surprisal):
        top = max(float(np.quantile(surprisal, 0.99)), 2 * threshold)
        width = (threshold if threshold > 0 else top / 10) / 5  # the threshold is a bin edge
        edges = np.arange(0.0, top + width, width)
        totals = np.histogram(np.clip(surprisal, 0, edges[-1]), bins=edges)[0].astype(float)
        bottom = np.zeros(len(totals))
        for value in range(3):
            counts = np.histogram(np.clip(surprisal[choice == value], 0, edges[-1]), bins=edges)[0]
            share = 100 * np.divide(counts, totals, out=np.zeros(len(totals)), where=totals > 0)
            share_ax.bar(edges[:-1], share, width=width, bottom=bottom, align="edge",
                         color=CHOICE_COLORS[value], label=labels[value])
            bottom += share
        count_ax.bar(edges[:-1], 100 * totals / totals.sum(), width=width, align="edge",
                     color="tab:gray")
    if threshold > 0:
        for ax in (share_ax, count_ax):
            ax.axvline(threshold, color="k", ls="--", lw=1.2)
        skipped = 100 * float(np.mean(choice == 2)) if len(choice) else 0.0
        share_ax.annotate(f"anti-hijack threshold {threshold:.2f} bits\n({anti_hijack_nats:g} nats, "
                          f"p_NN > {math.exp(-anti_hijack_nats):.3f});\nbelow it λ = 1: "
                          f"{skipped:.1f}% of bytes", (threshold, 50),
                          xytext=(8, 0), textcoords="offset points", fontsize=8, va="center",
                          bbox=dict(boxstyle="round", fc="white", alpha=0.85))
    share_ax.set_ylabel("gate choice (% of the bin's bytes)")
    share_ax.set_ylim(0, 100)
    fig.suptitle(f"Gate decision against the NN's confidence — {LEGACY}", fontsize=11)
    share_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    count_ax.set_ylabel("traced bytes (% of all)")
    count_ax.set_xlabel("the NN's confidence in the byte's token as the gate reads it: surprisal "
                        "per byte −log2(p_tok)/n\n(bits/byte; last bin: the 99th percentile and "
                        "beyond)")
    for ax in (share_ax, count_ax):
        ax.grid(alpha=0.3, axis="y")
    return fig


def gate_bpb_contribution(traces: dict) -> Figure:
    """What the gate does to the score, from the traced bytes split by gate choice. Left: each
    group's contribution to the stream's BPB, sum over the group of -log2 p / all traced bytes
    (bits/byte; the groups add up to the stream's BPB), for NN only, PPM only and the legacy
    mix. Right: each group's own bits per byte, sum over the group / the group's bytes. For the
    skipped bytes the mix IS the NN (λ = 1)."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    share_ax, own_ax = fig.subplots(1, 2)
    choice = traces["trace_lambda_choice"]
    series = (("trace_nn_logp", "NN only", "tab:blue"), ("trace_ppm_logp", "PPM only", "tab:green"),
              ("trace_mix_logp", "legacy mix (NOT normalized)", "tab:red"))
    order = (2, 1, 0)  # skipped (gated) first, then the two ungated λ choices
    names = [choice_labels(traces)[c].replace(": ", ":\n", 1) for c in order]
    labels = [f"{name}\n{100 * np.mean(choice == c):.1f}% of bytes" if len(choice) else name
              for name, c in zip(names, order)]
    width = 0.27
    total = max(len(choice), 1)
    for offset, (key, label, color) in enumerate(series):
        bits = -traces[key].astype(float) / math.log(2)
        contribution = [bits[choice == c].sum() / total for c in order]
        own = [bits[choice == c].mean() if np.any(choice == c) else math.nan for c in order]
        positions = [i + (offset - 1) * width for i in range(len(order))]
        share_ax.bar_label(share_ax.bar(positions, contribution, width, color=color,
                                        label=f"{label}: total {sum(contribution):.3f}"),
                           fmt="%.3f", fontsize=7)
        own_ax.bar_label(own_ax.bar(positions, own, width, color=color, label=label),
                         fmt="%.2f", fontsize=7)
    share_ax.set_ylabel("contribution to the stream's BPB (bits/byte)")
    share_ax.set_title("Share of the score by gate choice (groups add up)")
    own_ax.set_ylabel("bits/byte within the group")
    own_ax.set_title("Cost of a byte in each group")
    for ax in (share_ax, own_ax):
        ax.set_xticks(range(len(order)), labels, fontsize=8)
        ax.margins(y=0.25)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="best")  # clear of the bars, wherever the gate fires most
    stride = int(traces.get("trace_stride", 1))
    sampled = "every byte" if stride == 1 else f"every {stride}-th byte"
    fig.suptitle(f"What the anti-hijack gate does to the score ({len(choice):,} traced bytes: "
                 f"{sampled}) — {LEGACY}", fontsize=10)
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
    """Gate-skip rate (% of bytes with λ = 1) by byte position within the token, each bar labelled
    with the bytes at that position, and by the token's frequency in the scored stream."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    stats = traces["position_stats"].astype(float)
    bytes_at = stats.sum(1)
    shown = np.flatnonzero(bytes_at > 0)
    rate = 100 * stats[shown, 2] / bytes_at[shown]
    left.bar(shown, rate, color="tab:red")
    for position, value in zip(shown, rate):
        left.annotate(f"{int(bytes_at[position]):,}", (position, value), xytext=(0, 2),
                      textcoords="offset points", fontsize=6, ha="center", va="bottom", rotation=90)
    left.margins(y=0.3)  # room for the rotated byte counts above the tallest bar
    left.set_xlabel("byte position within its token (last bar: 31 and beyond)")
    left.set_ylabel("gate-skip rate (% of the position's bytes;\nnumbers: bytes at the position)")
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
                rates.append(100 * token_stats[seen][sel][:, 2].sum() / total)
                centers.append(np.exp(np.log(frequency[seen][sel]).mean()))
        right.plot(centers, rates, marker="o", color="tab:red")
    right.set_xscale("log")
    right.set_xlabel("token frequency in the scored stream (occurrences, log scale)")
    right.set_ylabel("gate-skip rate of its bytes (%)")
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
    ax.set_ylabel("audited positions (count)")
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
    ax.margins(y=0.1)  # the value labels stay inside the axes
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("BPB (bits/byte)")
    ax.set_title("Valid mixture vs neural (solid) and the legacy numbers (hatched)")
    return fig


def ppm_figures(run_dir) -> dict[str, Figure]:
    """Every PPM figure of a run folder, saved as `<run_dir>/plots/ppm_<name>.png`."""
    run_dir = Path(run_dir)
    traces = load_traces(run_dir / "ppm_trace.npz")
    summary = read_json(run_dir / "ppm.json")
    evaluation = read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else None
    figures = {
        "gate_decision": gate_decision_by_confidence(traces, summary.get("anti_hijack_nats", 0.277)),
        "gate_bpb_contribution": gate_bpb_contribution(traces),
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
