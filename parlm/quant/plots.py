"""Plots of one seed's quantization (quant.json and the artifact): per-tensor errors, scale
distributions, compressed size by tensor group, BPB before/after and bytes_total against the
cap. Each function returns a matplotlib Figure (no pyplot state); `quant_figures` saves PNGs
into `<run_dir>/plots/`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from parlm import runlog
from parlm.quant.artifact import read_artifact

GROUP_COLORS = {"embedding": "tab:purple", "attention": "tab:blue", "mlp": "tab:orange", "other": "tab:gray",
                "scales": "tab:green", "passthrough": "tab:red", "header": "tab:brown", "code": "black"}


def tensor_group(name: str, method: str) -> str:
    """embedding / attention / mlp / other for GPTQ tensors, passthrough otherwise."""
    if not method.startswith("gptq"):
        return "passthrough"
    if name.startswith("tok_emb."):
        return "embedding"
    return "attention" if ".attn." in name else "mlp" if ".mlp." in name else "other"


def plot_tensor_errors(quant: dict) -> Figure:
    """Relative Frobenius error ||W - W_hat|| / ||W|| of every float tensor (log scale), and for
    GPTQ tensors the Hessian-weighted relative error sqrt(tr(D H D^T) / tr(W H W^T))."""
    entries = [(name, e) for name, e in (quant.get("per_tensor") or {}).items() if e["rel_error"] > 0]
    fig = Figure(figsize=(max(6.0, 0.12 * len(entries) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    positions = np.arange(len(entries))
    colors = [GROUP_COLORS[tensor_group(n, e["method"])] for n, e in entries]
    ax.bar(positions, [e["rel_error"] for _, e in entries], color=colors)
    handles = [Patch(color=GROUP_COLORS[g], label=f"{g}: ||W - Ŵ|| / ||W||")
               for g in dict.fromkeys(tensor_group(n, e["method"]) for n, e in entries)]
    weighted = [(i, e["rel_hessian_error"]) for i, (_, e) in enumerate(entries) if "rel_hessian_error" in e]
    if weighted:
        handles.append(ax.scatter(*zip(*weighted), marker="_", s=60, color="black", zorder=3,
                                  label="Hessian-weighted (GPTQ)"))
    ax.set_yscale("log")
    ax.set_xticks(positions, [n.replace(".weight", "") for n, _ in entries], rotation=90, fontsize=6)
    ax.set_ylabel("relative error (fraction, log scale)")
    ax.set_title("Quantization error per tensor")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_scale_distributions(artifact_path: str | os.PathLike) -> Figure:
    """Histograms of the fp16 per-row scales s_r (log10) by group, from the artifact itself."""
    weights, methods = read_artifact(artifact_path)
    groups: dict[str, list[np.ndarray]] = {}
    for name, method in methods.items():
        if method.startswith("gptq"):
            groups.setdefault(tensor_group(name, method), []).append(weights[name + ".scale"].float().numpy())
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for group, arrays in groups.items():
        values = np.log10(np.concatenate(arrays))
        ax.hist(values, bins=60, alpha=0.6, color=GROUP_COLORS[group], label=f"{group} ({values.size} rows)")
    ax.set_xlabel("log10 of the row scale s = k·std(row)/R (weight units per integer step)")
    ax.set_ylabel("rows (count)")
    ax.set_title("SDClip row scales")
    if groups:
        ax.legend(fontsize=8)
    return fig


def plot_size_breakdown(quant: dict) -> Figure:
    """Compressed bytes by tensor group (exact: streams are compressed separately) and code."""
    sizes = {k: v for k, v in quant["stream_bytes"].items() if v} | {"code": quant["bytes_code"]}
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    names = list(sizes)
    bars = ax.bar(names, [sizes[n] / 1e3 for n in names], color=[GROUP_COLORS.get(n, "gray") for n in names])
    total = quant["bytes_total"]
    for bar, name in zip(bars, names):
        ax.annotate(f"{100 * sizes[name] / total:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("compressed size (kB = 10³ bytes)")
    ax.set_title(f"Artifact bytes by group (total {total:,})")
    return fig


def byte_size(value: float) -> str:
    """A byte count in decimal units (1 kB = 10^3 bytes, 1 MB = 10^6 bytes, as the cap is
    counted), e.g. 16000000 -> "16 MB", 49288 -> "49.3 kB"."""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def plot_cap(quant: dict) -> Figure:
    """bytes_model, bytes_code and bytes_total = model + code (stacked) as bars on a log byte
    axis against the cap (dashed line), so a ~0.2 MB demo artifact and a ~16 MB contest one are
    both visible; each row's exact count and its share of the cap are in the row's label, the
    verdict and the headroom cap - bytes_total (or the overshoot) in the title."""
    model, code, total, cap = quant["bytes_model"], quant["bytes_code"], quant["bytes_total"], quant["cap"]
    fig = Figure(figsize=(7.0, 2.6), layout="constrained")
    ax = fig.add_subplot()
    # Log bars need a positive base: a full decade below the smallest count's own decade, so the
    # shortest bar is at least one decade long (10,500 bytes on a 10 kB base would be a sliver).
    base = 10.0 ** (math.floor(math.log10(max(1, min(model, code)))) - 1)
    rows = {"model (compressed)": model, "code (train_gpt.py)": code, "bytes_total": total}
    ax.barh([2, 1], [model - base, code - base], left=base, color=["tab:blue", "black"], height=0.6)
    ax.barh([0], [model - base], left=base, color="tab:blue", height=0.6)
    ax.barh([0], [code], left=model, color="black", height=0.6)
    ax.set_yticks([2, 1, 0], [f"{name}\n{value:,} bytes ({100 * value / cap:.2f}% of cap)"
                              for name, value in rows.items()], fontsize=8)
    ax.axvline(cap, color="red", linestyle="--")
    # The label sits in the code row, which is always far short of the cap, so no bar covers it.
    ax.annotate(f"cap\n{cap:,}\nbytes", (cap, 0.5), xycoords=("data", "axes fraction"), xytext=(4, 0),
                textcoords="offset points", ha="left", va="center", fontsize=8, color="red")
    ax.set_xscale("log")
    ax.set_xlim(base, 8 * max(cap, total))  # room right of the cap line for its label
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: byte_size(value)))
    ax.set_xlabel("bytes (log scale; 1 MB = 10⁶ bytes)")
    if quant["fits_cap"]:
        ax.set_title(f"Fits the {byte_size(cap)} cap: {cap - total:,} bytes to spare", fontsize=10)
    else:
        ax.set_title(f"OVER the {byte_size(cap)} cap by {quant['overshoot']:,} bytes", fontsize=10, color="red")
    return fig


def plot_bpb(before: float, after: float) -> Figure:
    """Plain validation BPB of the EMA model and of the dequantized artifact."""
    fig = Figure(figsize=(4.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(["EMA (pre-quant)", "quantized"], [before, after], color=["tab:gray", "tab:blue"])
    for bar in bars:
        ax.annotate(f"{bar.get_height():.4f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    low = min(before, after)
    ax.set_ylim(low - 0.05 * low, max(before, after) + 0.02 * low)
    ax.set_ylabel("validation BPB (bits/byte; lower is better)")
    ax.set_title(f"Quantization cost: {after - before:+.4f} bits/byte")
    return fig


def quant_figures(run_dir: str | os.PathLike, bpb: dict | None = None, save: bool = True) -> dict[str, Figure]:
    """All quantization figures of a run folder (BPB only when `bpb` = {"prequant": x,
    "quantized": y} is given); saved as `<run_dir>/plots/quant_<name>.png`."""
    run_dir = Path(run_dir)
    quant = runlog.read_json(run_dir / "quant.json")
    figures = {"tensor_errors": plot_tensor_errors(quant),
               "scales": plot_scale_distributions(run_dir / quant["artifact"]),
               "size_breakdown": plot_size_breakdown(quant), "cap": plot_cap(quant)}
    if bpb is not None:
        figures["bpb"] = plot_bpb(bpb["prequant"], bpb["quantized"])
    if save:
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(run_dir / "plots" / f"quant_{name}.png", dpi=110)
    return figures
