"""Per-seed summaries and the multi-seed report: table, Welch t-test (parlm.report.stats), plots,
submission.

`summarize_seed(run_dir)` gathers one seed's stage results (train.json, quant.json, eval.json,
ppm.json) into `summary.json`. `build_report(run_root, baseline, out_dir)` puts the seeds of a
run side by side (table, mean and sample standard deviation, worst-case bytes_total), tests the
TTT BPB against a baseline set of seeds with Welch's t-test (another run's folder, or the
published PR #1858 seeds in `parlm/reference/pr1858.json`), draws the plots and exports the
submission folder.

Entry point: `python -m parlm.report --run-root runs/<id> [--baseline runs/<other>|pr1858]
--out DIR`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from parlm import runlog
from parlm.cli import stage_command
from parlm.runlog import seed_dirs
from parlm.config import ARTIFACT_CAP_BYTES
from parlm.quant.artifact import ArtifactError, artifact_fault, rebuild_fix, verify_artifact
from parlm.report.stats import WelchResult, mean, sample_std, welch_interval, welch_t_test  # noqa: F401

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"

# The columns of the per-seed table, in display order (valid BPBs first; the legacy PPM mixture
# last because it is not a normalized distribution, SPEC 6.6).
TABLE_COLUMNS = ("seed", "steps", "train_seconds", "prequant_bpb", "quantized_bpb", "sliding_bpb",
                 "ttt_bpb", "mix_bpb_legacy", "bytes_model", "bytes_code", "bytes_total")
BPB_STAGES = ("prequant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb")

# (pipeline stage, {summary key: key in its result file runlog.STAGE_RESULT_FILES[stage]},
#  required keys)
_SOURCES = (
    ("train",
     {"steps": "steps", "train_seconds": "train_seconds", "prequant_bpb": "prequant_bpb",
      "prequant_seconds": "prequant_seconds", "live_val_bpb": "live_val_bpb",
      "peak_memory_mib": "peak_memory_mib", "world_size": "world_size", "device": "device",
      "attention_backend": "attention_backend", "looping_step": "looping_step",
      "stalled": "stalled", "stalled_steps": "stalled_steps"},
     ("steps", "train_seconds", "prequant_bpb")),
    ("quant",
     {"bytes_model": "bytes_model", "bytes_code": "bytes_code", "bytes_total": "bytes_total",
      "fits_cap": "fits_cap", "cap": "cap", "hessian_seconds": "hessian_seconds",
      "gptq_seconds": "gptq_seconds", "compress_seconds": "compress_seconds"},
     ("bytes_model", "bytes_code", "bytes_total")),
    ("eval",
     {"quantized_bpb": "quantized_bpb", "sliding_bpb": "sliding_bpb", "ttt_bpb": "ttt_bpb",
      "quantized_seconds": "quantized_seconds", "sliding_seconds": "sliding_seconds",
      "ttt_seconds": "ttt_seconds", "compile_seconds": "compile_seconds",
      "mix_valid_bpb": "mix_valid_bpb", "eval_clock_seconds": "eval_clock_seconds",
      "eval_projection_seconds": "eval_projection_seconds",
      "eval_projection_target": "eval_projection_target",
      "eval_projection_budget_seconds": "eval_projection_budget_seconds",
      "eval_projection_over_budget": "eval_projection_over_budget"},
     ("quantized_bpb", "ttt_bpb")),
    ("ppm",
     {"mix_bpb_legacy": "mix_bpb", "ppm_only_bpb": "ppm_only_bpb", "nn_only_bpb": "nn_only_bpb",
      "gate_skip": "gate_skip", "ppm_bytes": "bytes", "ppm_seconds": "seconds",
      "ppm_subset_tokens": "subset_tokens"},
     ()),
)
EVAL_SECONDS_KEYS = ("prequant_seconds", "quantized_seconds", "sliding_seconds", "ttt_seconds",
                     "ppm_seconds")
# The contest's evaluation cap (seconds on 8xH100), for a seed whose eval.json records no budget.
EVAL_BUDGET_SECONDS = 600.0


class MissingStageError(FileNotFoundError):
    """A stage result file a summary needs is absent; the message names the stage to run."""


# ----------------------------------------------------------------------------------------------
# One seed

def _seed_of(run_dir: Path) -> int | None:
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        from parlm.config import Config

        return Config.load(config_path).seed
    name = run_dir.name
    return int(name.split("_", 1)[1]) if name.startswith("seed_") and name[5:].isdigit() else None


def summary_stage(config, run_dir) -> None:
    """The pipeline's "summary" stage: `summarize_seed(run_dir)` (the stage files hold all it
    reads, so the config is not needed)."""
    summarize_seed(run_dir)


TIMINGS_FILE = "timings.json"


def is_timing(key: str) -> bool:
    """Whether a summary key is a measurement of this machine and moment (wall seconds, peak
    memory, the over-budget verdict of the projected eval time) rather than a result the seed
    and the code determine."""
    return "seconds" in key.split("_") or key in ("peak_memory_mib", "eval_projection_over_budget")


def split_timings(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, timings) of a summary by `is_timing`, each in the summary's key order."""
    results = {k: v for k, v in summary.items() if not is_timing(k)}
    return results, {"seed": summary.get("seed"), **{k: v for k, v in summary.items() if is_timing(k)}}


def read_seed_summary(run_dir: str | Path) -> dict[str, Any]:
    """A seed's `summary.json` with its `timings.json` merged in (absent: results only)."""
    run_dir = Path(run_dir)
    summary = runlog.read_json(run_dir / "summary.json")
    if (run_dir / TIMINGS_FILE).exists():
        summary.update({k: v for k, v in runlog.read_json(run_dir / TIMINGS_FILE).items() if k != "seed"})
    return summary


def summarize_seed(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Assemble the summary of one seed from its stage result files, written as two files:
    `summary.json`, the results (a pure function of the seed, the code and the machine's
    arithmetic, so a step-count run such as the demo writes the same file every time), and
    `timings.json`, what the clock and the memory counters measured (`is_timing`). Returns both
    merged, as `read_seed_summary` reads them back.

    Keys: seed, steps, train_seconds, prequant_bpb, quantized_bpb, sliding_bpb, ttt_bpb,
    mix_bpb_legacy (ppm.json mix_bpb: NOT a valid BPB, SPEC 6.6), bytes_model, bytes_code,
    bytes_total, the seconds of each evaluation stage (prequant, quantized, sliding, ttt, ppm)
    and their sum `eval_seconds_total`, plus the optional extras the stage files carry: among
    them train.json's `stalled`/`stalled_steps` and eval.json's contest clock
    (`eval_clock_seconds`) and 8xH100 projection (`eval_projection_*`), which `seed_flags` reads.
    A missing file raises MissingStageError naming the stage and the command that makes it; an
    artifact that differs from quant.json's record raises ArtifactError (file and fix)."""
    run_dir = Path(run_dir)
    verify_artifact(run_dir)
    summary: dict[str, Any] = {"seed": _seed_of(run_dir)}
    for stage, mapping, required in _SOURCES:
        path = run_dir / runlog.STAGE_RESULT_FILES[stage]
        if not path.exists():
            raise MissingStageError(
                f"{path} is missing: the '{stage}' stage has not finished for this seed; run "
                f"`python -m parlm.{stage} --run-dir {run_dir}` (or resume the whole run with "
                f"`python -m parlm.run ... --run-id {run_dir.parent.name}`)")
        data = runlog.read_json(path)
        absent = [data_key for data_key in (mapping[k] for k in required) if data_key not in data]
        if absent:
            raise MissingStageError(f"{path} lacks {absent}; rerun the '{stage}' stage")
        for summary_key, data_key in mapping.items():
            summary[summary_key] = data.get(data_key)
    seconds = [summary.get(k) for k in EVAL_SECONDS_KEYS]
    summary["eval_seconds_total"] = math.fsum(s for s in seconds if isinstance(s, (int, float)))
    if write:
        results, timings = split_timings(summary)
        runlog.write_json(run_dir / TIMINGS_FILE, timings)
        runlog.write_json(run_dir / "summary.json", results)
    return summary


# ----------------------------------------------------------------------------------------------
# Several seeds

def load_run_summaries(run_root: str | Path) -> list[dict[str, Any]]:
    """One summary per finished seed of a run (summary.json with timings.json, else assembled
    from stage files).

    Raises FileNotFoundError when the folder holds no seed with all stage results."""
    summaries, problems = [], []
    for directory in seed_dirs(run_root):
        path = directory / "summary.json"
        try:
            summaries.append(read_seed_summary(directory) if path.exists()
                             else summarize_seed(directory, write=False))
        except (MissingStageError, ArtifactError) as exc:
            problems.append(str(exc))
    if not summaries:
        detail = ("; ".join(problems)) if problems else "no seed_<n> folders"
        raise FileNotFoundError(f"{run_root} holds no finished seed ({detail})")
    return summaries


def load_reference(name: str = "pr1858") -> dict[str, Any]:
    """A published baseline recorded in parlm/reference/<name>.json."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise FileNotFoundError(f"no reference {name!r}; known: {known} or a run folder")
    return runlog.read_json(path)


def load_baseline(baseline: str | Path) -> tuple[str, list[dict[str, Any]], set[str]]:
    """(label, per-seed summaries, datasets) of a baseline: a reference name (`pr1858`) or a
    run folder. `datasets` holds the dataset names it was measured on (empty when unknown)."""
    text = str(baseline)
    if (REFERENCE_DIR / f"{text}.json").exists() and not Path(text).is_dir():
        reference = load_reference(text)
        datasets = {reference["dataset"]} if reference.get("dataset") else set()
        return reference.get("name", text), list(reference["seeds"].values()), datasets
    return f"run {Path(text).name}", load_run_summaries(text), run_datasets(text)


def run_datasets(run_root: str | Path) -> set[str]:
    """The dataset names (`Config.resolved_dataset_name`) in the seeds' config.yaml files."""
    from parlm.config import Config

    return {Config.load(directory / "config.yaml").resolved_dataset_name
            for directory in seed_dirs(run_root) if (directory / "config.yaml").exists()}


def artifact_problems(run_root: str | Path) -> list[str]:
    """One line per seed whose artifact differs from its quant.json record (file, fault, fix):
    its bytes_total describes a file that is no longer there."""
    problems = []
    for directory in seed_dirs(run_root):
        fault = artifact_fault(directory)
        if fault is not None:
            problems.append(str(ArtifactError(fault[0], fault[1], rebuild_fix(directory))))
    return problems


def seed_flags(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per seed problem that its BPBs do not show, in seed order:

    - stalled: train.json `stalled` (the logged train loss sat within the stall tolerance of
      ln(vocab_size), a uniform predictor, for `stall_steps` steps): the seed's scores are
      those of a model that did not learn;
    - over budget: `eval_projection_seconds` > `eval_projection_budget_seconds` (600 s when
      eval.json records none): the evaluation would not fit the contest's cap on the target
      machine. A summary without a projection (an older eval.json) is not flagged."""
    flags = []
    for summary in summaries:
        seed = summary.get("seed")
        if summary.get("stalled"):
            first, last = summary.get("stalled_steps") or ("?", "?")
            flags.append(f"warning: seed {seed} STALLED: its train loss sat at ln(vocab_size), a "
                         f"uniform predictor, over steps {first}..{last}; its scores are those of a "
                         f"model that did not learn (train.json stalled=true: lower the learning "
                         f"rates and retrain it)")
        projected = summary.get("eval_projection_seconds")
        budget = summary.get("eval_projection_budget_seconds") or EVAL_BUDGET_SECONDS
        if isinstance(projected, (int, float)) and projected > budget:
            target = summary.get("eval_projection_target") or "the target machine"
            clock = summary.get("eval_clock_seconds")
            measured = f"; measured {clock:.1f} s here" if isinstance(clock, (int, float)) else ""
            flags.append(f"warning: seed {seed} OVER the eval budget: projected {projected:.1f} s on "
                         f"{target} exceeds {budget:.0f} s (eval.json eval_projection_seconds"
                         f"{measured})")
    return flags


def comparability(ours: set[str], theirs: set[str]) -> tuple[bool | None, str | None]:
    """(comparable, note): BPBs on different datasets measure different tasks, so a t-test
    between them says nothing about either method. None when a side's dataset is unknown."""
    if not ours or not theirs:
        return None, "dataset of one side unknown; check that both ran on the same data"
    if ours == theirs:
        return True, None
    return False, (f"NOT comparable: the baseline was measured on {', '.join(sorted(theirs))}, this "
                   f"run on {', '.join(sorted(ours))}; the t-test below only shows the mechanics")


def column_statistics(summaries: Sequence[dict[str, Any]],
                      columns: Iterable[str] = TABLE_COLUMNS) -> dict[str, dict[str, float]]:
    """{column: {mean, std, min, max, n}} over the seeds that have a number in that column."""
    stats = {}
    for column in columns:
        if column == "seed":
            continue
        values = [s[column] for s in summaries if isinstance(s.get(column), (int, float))
                  and not isinstance(s.get(column), bool)]
        if values:
            stats[column] = {"mean": mean(values), "std": sample_std(values), "min": min(values),
                             "max": max(values), "n": len(values)}
    return stats


def _format(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if column.endswith("_bpb") or column == "mix_bpb_legacy":
        return f"{value:.5f}"
    if column.startswith("bytes") or column in ("steps", "seed"):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown_table(summaries: Sequence[dict[str, Any]], stats: dict[str, dict[str, float]],
                   columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The per-seed table with mean and std rows, as GitHub markdown."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summaries:
        lines.append("| " + " | ".join(_format(c, row.get(c)) for c in columns) + " |")
    for label in ("mean", "std"):
        cells = [label]
        for column in columns[1:]:
            value = stats.get(column, {}).get(label)
            if value is None or math.isnan(value):
                cells.append("-")
            elif column.endswith("_bpb") or column == "mix_bpb_legacy":
                cells.append(f"{value:.5f}")
            else:
                cells.append(f"{value:,.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def export_submission(run_root: Path, out_dir: Path) -> dict[str, Any]:
    """Export the records folder with the quantization area's `parlm.submission.export(run_root,
    out_dir)`. A run it refuses (unfinished seed, a seed over the cap) is recorded with the
    reason instead of failing the whole report; so is a parlm without that module."""
    try:
        from parlm.submission import export
        from parlm.submission.records import ExportError
    except ImportError as exc:
        return {"exported": False, "reason": f"parlm.submission.export is not available ({exc})"}
    try:
        result = export(run_root, out_dir)
    except ExportError as exc:
        return {"exported": False, "reason": f"submission not exported: {exc}"}
    keys = ("val_bpb", "val_bpb_std", "bytes_total", "bytes_code", "cap", "fits_cap", "run_cap",
            "code_sha256")
    return {"exported": True, "path": str(out_dir), **{k: result.get(k) for k in keys}}


def build_report(run_root: str | Path, baseline: str | Path | None = "pr1858",
                 out_dir: str | Path | None = None, plots: bool = True,
                 submission: bool = True) -> dict[str, Any]:
    """Write the multi-seed report of `run_root` into `out_dir` (default `<run_root>/report`).

    Files: `report.json` (per-seed summaries, column statistics, worst-case bytes_total and the
    cap check, `seed_flags` (a stalled seed, an evaluation projected over budget), Welch test of
    ttt_bpb against the baseline with a `comparable` flag: False when the baseline ran on
    another dataset), `table.md` (the table, then one line per seed flag), `plots/*.png`, and
    `submission/` (from parlm.submission). Returns the report dict."""
    run_root = Path(run_root)
    out_dir = Path(out_dir) if out_dir is not None else run_root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = load_run_summaries(run_root)
    stats = column_statistics(summaries)
    totals = [s["bytes_total"] for s in summaries if s.get("bytes_total") is not None]
    worst = max(totals) if totals else None
    damaged = artifact_problems(run_root)
    report: dict[str, Any] = {
        "run_root": str(run_root.resolve()),
        "seeds": [s["seed"] for s in summaries],
        "summaries": summaries,
        "statistics": stats,
        "worst_bytes_total": worst,
        "artifact_cap_bytes": ARTIFACT_CAP_BYTES,
        # No verdict on a size whose file is damaged or gone: it no longer describes an artifact.
        "fits_cap": None if worst is None or damaged else worst <= ARTIFACT_CAP_BYTES,
        "artifact_problems": damaged,
        "seed_flags": seed_flags(summaries),
    }
    base: list[dict[str, Any]] = []
    label = "baseline"
    if baseline is not None:
        label, base, base_datasets = load_baseline(baseline)
        ours = [s["ttt_bpb"] for s in summaries if s.get("ttt_bpb") is not None]
        theirs = [s["ttt_bpb"] for s in base if s.get("ttt_bpb") is not None]
        our_datasets = run_datasets(run_root)
        comparable, note = comparability(our_datasets, base_datasets)
        entry: dict[str, Any] = {"label": label, "source": str(baseline),
                                 "seeds": [s.get("seed") for s in base],
                                 "datasets": sorted(our_datasets), "baseline_datasets": sorted(base_datasets),
                                 "comparable": comparable, "comparability_note": note}
        try:
            entry["welch_ttt_bpb"] = welch_t_test(ours, theirs).to_dict()
        except ValueError as exc:
            entry["welch_ttt_bpb"] = None
            entry["welch_note"] = str(exc)
        report["baseline"] = entry
    table = markdown_table(summaries, stats)
    # Below the table, which parlm.run prints at the end, so a flagged seed is seen there.
    flag_lines = ["", *(f"- {flag}" for flag in report["seed_flags"])] if report["seed_flags"] else []
    (out_dir / "table.md").write_text("\n".join([table, *flag_lines]) + "\n")
    if plots:
        from parlm.report import plots as plotting

        # Another run of ours shares the scale; published 8xH100 figures would flatten a demo.
        overlay = base if baseline is not None and Path(str(baseline)).is_dir() else []
        report["plots"] = plotting.save_report_plots(run_root, summaries, out_dir / "plots",
                                                     overlay, label)
    if submission and damaged:
        report["submission"] = {"exported": False, "reason": f"not exported: {damaged[0]}"}
    elif submission:
        report["submission"] = export_submission(run_root, out_dir / "submission")
    runlog.write_json(out_dir / "report.json", report)
    return report


def format_report(report: dict[str, Any], table: bool = True) -> str:
    """A short human-readable account of a report dict (what the CLI prints)."""
    lines = [markdown_table(report["summaries"], report["statistics"]), ""] if table else []
    worst = report.get("worst_bytes_total")
    damaged = report.get("artifact_problems") or []
    if worst is not None and damaged:
        lines.append(f"worst-case bytes_total {worst:,} is NOT verified against the "
                     f"{ARTIFACT_CAP_BYTES:,}-byte cap: {len(damaged)} artifact(s) differ from quant.json")
        lines.extend(f"  {problem}" for problem in damaged)
    elif worst is not None:
        verdict = "fits" if report["fits_cap"] else "EXCEEDS"
        lines.append(f"worst-case bytes_total {worst:,} {verdict} the {ARTIFACT_CAP_BYTES:,}-byte cap")
    lines.extend(report.get("seed_flags") or [])
    baseline = report.get("baseline")
    if baseline:
        if baseline.get("comparability_note"):
            lines.append(f"TTT BPB vs {baseline['label']}: {baseline['comparability_note']}")
        welch = baseline.get("welch_ttt_bpb")
        if welch:
            lines.append(
                f"TTT BPB vs {baseline['label']}: diff {welch['difference']:+.5f} "
                f"(95% interval [{welch['low']:+.5f}, {welch['high']:+.5f}], t={welch['t']:.3f}, df={welch['df']:.2f}, p two-sided={welch['p_two_sided']:.3g}, "
                f"p(ours lower)={welch['p_less']:.3g})")
        else:
            lines.append(f"TTT BPB vs {baseline['label']}: {baseline.get('welch_note')}")
    sub = report.get("submission")
    if sub:
        lines.append(f"submission: {sub.get('path') if sub.get('exported') else sub.get('reason')}")
    lines.append("note: mix_bpb_legacy is the PR #1858 PPM byte mixture; it is not a valid BPB "
                 "(not a normalized distribution, SPEC 6.6).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m parlm.report --run-root DIR [--baseline RUN|pr1858|none] [--out DIR]
    [--no-plots] [--no-submission] [--summarize]` (parlm.cli.stage_command): print the report
    (`format_report`) and where it went; a missing seed or a bad input ends in `error: <message>`
    and exit code 2."""
    return stage_command(
        "python -m parlm.report",
        "Multi-seed report of a parlm run: per-seed table, mean/std, Welch t-test of "
        "TTT BPB against a baseline, worst-case bytes_total, plots, submission folder.",
        report_command, argv, run_dir_help="run folder runs/<run_id> with seed_<n>/",
        user_errors=(ValueError, ArtifactError), run_dir_flag="--run-root",
        add_arguments=add_report_arguments, config_flags=False, error_format="error: {error}",
        error_code=2)


def add_report_arguments(parser) -> None:
    """The report's own flags besides --run-root: --baseline, --out, --no-plots,
    --no-submission, --summarize."""
    parser.add_argument("--baseline", default="pr1858",
                        help="another run folder, or 'pr1858' (published PR #1858 seeds), or "
                             "'none' (default: pr1858)")
    parser.add_argument("--out", help="output folder (default: <run-root>/report)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-submission", action="store_true", help="skip the submission export")
    parser.add_argument("--summarize", action="store_true",
                        help="(re)write each seed's summary.json from its stage files first")


def report_command(config: None, run_root: str, args) -> None:
    """What `main` runs: with --summarize first `summarize_seed` every seed of `run_root`, then
    `build_report` against --baseline ('none': no baseline) and print it (`format_report`) and
    its folder. The report reads only the run's files, so there is no config (None)."""
    if args.summarize:
        for directory in seed_dirs(run_root):
            summarize_seed(directory)
    baseline = None if str(args.baseline).lower() == "none" else args.baseline
    report = build_report(run_root, baseline, args.out, plots=not args.no_plots,
                          submission=not args.no_submission)
    print(format_report(report))
    print(f"report written to {Path(args.out) if args.out else Path(run_root) / 'report'}")
