"""Plots of one training run from its run folder (`metrics.jsonl`, `train.json`).

`plot_training(run_dir)` draws train loss, validation BPB, the LR multiplier and throughput
against the step, marks where depth recurrence switched on, and saves
`<run_dir>/plots/train_curves.png`.
"""
from __future__ import annotations

import os
from pathlib import Path

from parlm import runlog


def training_curves(run_dir: str | os.PathLike) -> dict:
    """Columns of the run's records: train (step, train_loss, lr_scale, tok_per_sec,
    tok_per_sec_interval, looping), val (step, val_bpb), prequant (step, val_bpb) and the
    step where looping switched on (train.json's looping_step, else the first looped record)."""
    train = runlog.read_metrics(run_dir, "train")
    val = runlog.read_metrics(run_dir, "val")
    prequant = runlog.read_metrics(run_dir, "prequant")
    columns = {
        "train": {key: [row.get(key) for row in train]
                  for key in ("step", "train_loss", "lr_scale", "tok_per_sec", "tok_per_sec_interval", "looping")},
        "val": {key: [row.get(key) for row in val] for key in ("step", "val_bpb")},
        "prequant": {key: [row.get(key) for row in prequant] for key in ("step", "val_bpb")},
    }
    looping_step = None
    summary_path = Path(run_dir) / "train.json"
    if summary_path.exists():
        looping_step = runlog.read_json(summary_path).get("looping_step")
    if looping_step is None:
        looped = [row["step"] for row in train if row.get("looping")]
        looping_step = looped[0] if looped else None
    columns["looping_step"] = looping_step
    return columns


def plot_training(run_dir: str | os.PathLike, save: bool = True):
    """A 2x2 figure (loss, val BPB, LR multiplier, tok/s vs step) with the looping switch drawn
    as a dashed line; saved as <run_dir>/plots/train_curves.png when `save`. Returns the figure."""
    import matplotlib.pyplot as plt

    curves = training_curves(run_dir)
    train, val, prequant = curves["train"], curves["val"], curves["prequant"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax_loss, ax_bpb, ax_lr, ax_speed = axes.ravel()

    ax_loss.plot(train["step"], train["train_loss"], marker=".", lw=1)
    ax_loss.set(title="train loss", ylabel="train loss (nats/token)", xlabel="step")
    if val["step"]:
        ax_bpb.plot(val["step"], val["val_bpb"], marker="o", label="live model")
    if prequant["step"]:
        ax_bpb.plot(prequant["step"], prequant["val_bpb"], marker="*", ms=12, ls="none", label="EMA (pre-quant)")
    ax_bpb.set(title="validation BPB (EMA lags the live weights)", ylabel="validation BPB (bits/byte)",
               xlabel="step")
    if val["step"] or prequant["step"]:
        ax_bpb.legend()
    ax_lr.plot(train["step"], train["lr_scale"], marker=".", lw=1)
    ax_lr.set(title="LR multiplier (wallclock schedule)", ylabel="LR / peak LR (fraction)", xlabel="step",
               ylim=(-0.05, 1.05))
    ax_speed.plot(train["step"], train["tok_per_sec"], marker=".", lw=1, label="cumulative")
    ax_speed.plot(train["step"], train["tok_per_sec_interval"], marker=".", lw=1, label="over log interval")
    ax_speed.set(title="throughput", ylabel="tokens/s", xlabel="step")
    ax_speed.legend()
    if curves["looping_step"] is not None:
        for ax in axes.ravel():
            ax.axvline(curves["looping_step"], color="gray", ls="--", lw=1)
        ax_loss.annotate("looping on", (curves["looping_step"], 0.95), xycoords=("data", "axes fraction"),
                         ha="left", va="top", color="gray")
    folder = Path(run_dir).resolve()
    figure.suptitle(f"training: {folder.parent.name}/{folder.name}")
    if save:
        out = Path(run_dir) / "plots"
        out.mkdir(parents=True, exist_ok=True)
        figure.savefig(out / "train_curves.png", dpi=110)
    return figure
