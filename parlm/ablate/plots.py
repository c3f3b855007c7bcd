"""Figure of an ablation: each variant's delta per stage with its 95% interval, and the PR's
published figure beside it where one exists (parlm/reference/frontier.json)."""
from __future__ import annotations

import matplotlib.pyplot as plt

from parlm.ablate.results import METRICS


def delta_figure(result: dict, published: dict | None = None):
    """One panel per metric: horizontal bar = measured delta (variant - base), error bar = 95%
    interval (none with a single seed), diamond = the PR's reported delta for that metric."""
    variants = list(result["variants"])
    metrics = [m for m, _, _ in METRICS if any(m in rows for rows in result["variants"].values())]
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)), 0.5 * len(variants) + 1.8),
                                squeeze=False, sharey=True)
    for axis, metric in zip(axes[0], metrics):
        for position, variant in enumerate(variants):
            row = result["variants"][variant].get(metric)
            if row is None:
                continue
            error = None if row["low"] is None else [[row["delta"] - row["low"]], [row["high"] - row["delta"]]]
            axis.barh(position, row["delta"], xerr=error, color="tab:blue", alpha=0.7, capsize=3)
            reported = (published or {}).get(variant, {})
            if reported.get("metric") == metric:
                axis.plot(reported["reported_delta"], position, "D", color="tab:red",
                          label="published (PR)")
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(metric, fontsize=9)
        axis.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(variants)), variants)
    figure.suptitle(f"delta against {result['base']} (bars: measured, 95% interval; diamonds: the PR's figure)",
                    fontsize=10)
    figure.tight_layout()
    return figure
