"""`python -m parlm.ablate`: parse, build the job list, dispatch, write the results."""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Sequence

from parlm import runlog
from parlm.ablate.dispatch import EXECUTORS, PROJECT_ROOT, dispatch
from parlm.ablate.results import write_results
from parlm.ablate.variants import VARIANTS_FILE, build_jobs, load_variants
from parlm.cli import add_run_arguments
from parlm.config import ConfigError, parse_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parlm.ablate",
        description="Run every (variant, seed) through parlm.run into runs/<id>/<variant>/seed_<s>/ and "
                    "write each variant's delta against the base (ablation.json, ablation.md). "
                    "Equal steps: --steps N; equal wall clock: --set max_wallclock_seconds=S. "
                    "Rerun with the same --run-id to resume.")
    add_run_arguments(parser, preset_help="preset of every variant without its own", seeds=(42, 314),
                      run_id_help="ablation folder name (default ablate-<preset>-<time>); existing resumes",
                      runs_dir=str(PROJECT_ROOT / "runs"), nproc_help="GPUs per job (torchrun)",
                      keep_going_help="go on after a failed job (exit code 1)")
    parser.add_argument("--base", default="base", help="the variant every other is compared with")
    parser.add_argument("--variants", required=True, help="comma-separated variant names (variants.yaml)")
    parser.add_argument("--steps", type=int, help="equal-steps mode: iterations=N, wall-clock limit off")
    parser.add_argument("--variants-file", default=str(VARIANTS_FILE))
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="local: concurrent jobs per GPU")
    parser.add_argument("--timeout-min", type=int, default=120, help="submitit: minutes per job")
    parser.add_argument("--slurm-partition", help="slurm: partition")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    run_id = args.run_id or f"ablate-{args.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        parse_overrides(args.overrides)
        variants = load_variants(args.variants_file)
        jobs = build_jobs(variants, args.base, names, list(args.seeds), args.preset, run_id, args.runs_dir,
                          args.overrides, args.steps, args.nproc)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_root = Path(args.runs_dir) / run_id
    paired = {name: variants[name].paired for name in [args.base, *names]}
    runlog.write_json(run_root / "ablation_plan.json",
                      {"preset": args.preset, "base": args.base, "variants": names, "seeds": list(args.seeds),
                       "steps": args.steps, "overrides": args.overrides, "paired": paired,
                       "executor": args.executor, "jobs": [job.command("python") for job in jobs]})
    results = dispatch(jobs, args.executor, args.jobs_per_gpu, args.keep_going, args.timeout_min,
                       args.slurm_partition)
    failed = [r for r in results if r["returncode"] != 0]
    write_results(run_root, args.base, paired)
    print((run_root / "ablation.md").read_text(), flush=True)
    for result in failed:
        print(f"FAILED: {result['variant']} seed {result['seed']} ({result.get('error') or result['log']}); "
              f"rerun with --run-id {run_id} to resume", file=sys.stderr)
    return 1 if failed or len(results) < len(jobs) else 0
