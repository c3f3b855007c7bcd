"""Ablation results: each variant's delta against the base per stage, with a 95% interval over
seeds, written to runs/<id>/ablation.json and ablation.md.

For a metric x, base seeds b_1..b_m and variant seeds v_1..v_n:
- unpaired (trained separately): delta = mean(v) - mean(b), Welch's interval
  delta +- t_{0.975, nu} sqrt(s_v^2/n + s_b^2/m), nu the Welch-Satterthwaite degrees of freedom
  (`scipy.stats.ttest_ind(equal_var=False).confidence_interval`);
- paired (same trained weights per seed): d_i = v_i - b_i over the common seeds,
  delta = mean(d) +- t_{0.975, k-1} s_d / sqrt(k) (`scipy.stats.ttest_rel`).
With one seed (or identical differences) the interval is undefined (None) or the point.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from parlm import runlog

# (metric, result file of the seed folder, key in it); lower is better for the BPBs and bytes.
METRICS = (
    ("prequant_bpb", "train.json", "prequant_bpb"),
    ("quantized_bpb", "eval.json", "quantized_bpb"),
    ("sliding_bpb", "eval.json", "sliding_bpb"),
    ("ttt_bpb", "eval.json", "ttt_bpb"),
    ("bytes_total", "quant.json", "bytes_total"),
    ("train_tok_per_sec_before_loop", "train.json", "tok_per_sec_before_loop"),
    ("train_tok_per_sec_after_loop", "train.json", "tok_per_sec_after_loop"),
)
REFERENCE_FILE = Path(__file__).resolve().parents[1] / "reference" / "frontier.json"


def seed_metrics(seed_dir: Path) -> dict[str, float]:
    """The METRICS found in one seed folder's stage result files (missing ones left out)."""
    values, cache = {}, {}
    for metric, file_name, key in METRICS:
        if file_name not in cache:
            path = seed_dir / file_name
            cache[file_name] = runlog.read_json(path) if path.exists() else {}
        value = cache[file_name].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[metric] = float(value)
    return values


def collect(run_root: Path) -> dict[str, dict[int, dict[str, float]]]:
    """variant -> seed -> metrics, from runs/<id>/<variant>/seed_<s>/."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for variant_dir in sorted(p for p in Path(run_root).iterdir() if p.is_dir()):
        seeds = {int(p.name[5:]): seed_metrics(p) for p in sorted(variant_dir.glob("seed_*")) if p.name[5:].isdigit()}
        if seeds:
            found[variant_dir.name] = seeds
    return found


def welch_interval(variant: list[float], base: list[float], confidence: float = 0.95) -> tuple:
    """(delta, low, high) = Welch interval of mean(variant) - mean(base) (module docstring)."""
    from scipy import stats

    delta = sum(variant) / len(variant) - sum(base) / len(base)
    if len(variant) < 2 or len(base) < 2:
        return delta, None, None
    if len(set(variant)) == 1 and len(set(base)) == 1:
        return delta, delta, delta
    interval = stats.ttest_ind(variant, base, equal_var=False).confidence_interval(confidence)
    return delta, float(interval.low), float(interval.high)


def paired_interval(variant: list[float], base: list[float], confidence: float = 0.95) -> tuple:
    """(delta, low, high) = paired t interval of mean(variant_i - base_i) (module docstring)."""
    from scipy import stats

    differences = [v - b for v, b in zip(variant, base)]
    delta = sum(differences) / len(differences)
    if len(differences) < 2:
        return delta, None, None
    if len(set(differences)) == 1:
        return delta, delta, delta
    interval = stats.ttest_rel(variant, base).confidence_interval(confidence)
    return delta, float(interval.low), float(interval.high)


def ablation_table(data: dict, base: str, paired: dict[str, bool]) -> dict:
    """{variant: {metric: {base_mean, variant_mean, delta, low, high, seeds, paired}}} for every
    variant but the base; paired variants use the seeds both have."""
    table = {}
    base_seeds = data.get(base, {})
    for variant, seeds in data.items():
        if variant == base:
            continue
        rows = {}
        for metric, _, _ in METRICS:
            is_paired = paired.get(variant, False)
            if is_paired:
                common = sorted(s for s in seeds if metric in seeds[s] and metric in base_seeds.get(s, {}))
                v, b = [seeds[s][metric] for s in common], [base_seeds[s][metric] for s in common]
            else:
                v = [m[metric] for m in seeds.values() if metric in m]
                b = [m[metric] for m in base_seeds.values() if metric in m]
            if not v or not b:
                continue
            delta, low, high = (paired_interval if is_paired else welch_interval)(v, b)
            rows[metric] = {"base_mean": sum(b) / len(b), "variant_mean": sum(v) / len(v), "delta": delta,
                            "low": low, "high": high, "seeds": [len(v), len(b)], "paired": is_paired,
                            "within_noise": None if low is None else bool(low <= 0 <= high)}
        table[variant] = rows
    return table


def _cell(metric: str, row: dict | None) -> str:
    if not row:
        return "-"
    if metric.startswith(("bytes", "train_tok")):
        fmt = lambda x: f"{x:+,.0f}"  # noqa: E731 (bytes and tok/s as integers)
    else:
        fmt = lambda x: f"{x:+.5f}"  # noqa: E731 (BPB to 5 places)
    interval = "" if row["low"] is None else f" [{fmt(row['low'])}, {fmt(row['high'])}]"
    return fmt(row["delta"]) + interval


def markdown(table: dict, base: str) -> str:
    """The table as Markdown: one row per variant, one column per metric, delta [95% interval]."""
    metrics = [metric for metric, _, _ in METRICS]
    lines = [f"Delta against `{base}` (variant - base), 95% interval over seeds "
             f"(paired t for paired variants, Welch otherwise).", "",
             "| variant | paired | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for variant, rows in table.items():
        paired = any(r["paired"] for r in rows.values())
        lines.append(f"| {variant} | {'yes' if paired else 'no'} | " + " | ".join(_cell(m, rows.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def published_figures(path: Path = REFERENCE_FILE) -> dict:
    """The PRs' own reported gains (parlm/reference/frontier.json), by variant name."""
    return json.loads(Path(path).read_text())["techniques"]


def write_results(run_root: Path, base: str, paired: dict[str, bool]) -> dict:
    """Collect, tabulate and write ablation.json and ablation.md into `run_root`."""
    run_root = Path(run_root)
    data = collect(run_root)
    table = ablation_table(data, base, paired)
    result = {"base": base, "variants": table, "seeds": {v: sorted(s) for v, s in data.items()},
              "raw": {v: {str(s): m for s, m in seeds.items()} for v, seeds in data.items()}}
    runlog.write_json(run_root / "ablation.json", result)
    (run_root / "ablation.md").write_text(markdown(table, base))
    return result
