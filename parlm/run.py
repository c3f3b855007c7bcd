"""Run the numbered notebooks headless with papermill: every stage, per seed, then the report.

    python -m parlm.run --preset demo --seeds 42 314 [--nproc N] [--set key=value ...]
                        [--run-id ID] [--baseline pr1858|runs/<other>]

For each seed, notebooks 01-06 execute into `runs/<run_id>/seed_<seed>/` (executed copies named
like `01_data.ipynb`, next to the stage files they produce); then 07 executes into
`runs/<run_id>/report/`. Each notebook receives the parameters `preset`, `run_dir` (absolute),
`seed`, `overrides` (list of "key=value") and `nproc`.

Safety and resume:
- a notebook executes into `.<name>.running.ipynb` and is renamed to `<name>.ipynb` only after
  it finished; a failure renames it to `<name>.FAILED.ipynb` and stops the run with the error and
  that path (other seeds' folders are untouched);
- each finished notebook leaves a marker `.stages/notebook_<name>.done` (the stages themselves
  leave theirs through parlm.pipeline, only after all their outputs are written); rerunning the
  same `--run-id` skips finished notebooks, and `pipeline.prepare_run` refuses a config that
  differs from the one saved in the folder.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from parlm import runlog
from parlm.config import Config, ConfigError, parse_overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
# (notebook stem, the pipeline stage whose files it produces; None for a notebook that only
# inspects, such as the model tour).
SEED_NOTEBOOKS = (
    ("01_data", "data"),
    ("02_model", None),
    ("03_train", "train"),
    ("04_quantize", "quant"),
    ("05_ttt_eval", "eval"),
    ("06_ppm_mixture", "ppm"),
)
REPORT_NOTEBOOK = "07_report"
DEFAULT_SEEDS = (42, 314, 999)


class NotebookFailed(RuntimeError):
    """A notebook raised; carries the path of its saved, executed copy."""

    def __init__(self, message: str, notebook_path: Path):
        super().__init__(message)
        self.notebook_path = notebook_path


@dataclass
class RunPlan:
    """Everything one `python -m parlm.run` invocation does."""

    preset: str
    seeds: list[int]
    run_id: str
    runs_dir: Path
    overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    baseline: str = "pr1858"
    kernel_name: str = "python3"
    notebook_dir: Path = NOTEBOOK_DIR
    cwd: Path = PROJECT_ROOT
    progress_bar: bool = True
    log_output: bool = True
    keep_going: bool = False
    seed_notebooks: tuple = SEED_NOTEBOOKS
    report_notebook: str | None = REPORT_NOTEBOOK  # None: no report notebook (tests)

    @property
    def run_root(self) -> Path:
        return self.runs_dir / self.run_id

    def seed_dir(self, seed: int) -> Path:
        return self.run_root / f"seed_{seed}"

    @property
    def report_dir(self) -> Path:
        return self.run_root / "report"

    def seed_parameters(self, seed: int) -> dict:
        return {"preset": self.preset, "run_dir": str(self.seed_dir(seed)), "seed": seed,
                "overrides": list(self.overrides), "nproc": self.nproc}

    def report_parameters(self) -> dict:
        return {"preset": self.preset, "run_root": str(self.run_root),
                "report_dir": str(self.report_dir), "seeds": list(self.seeds),
                "overrides": list(self.overrides), "baseline": self.baseline}


def default_run_id(preset: str, now: datetime.datetime | None = None) -> str:
    """`<preset>-<yyyymmdd-hhmmss>` in local time."""
    now = now or datetime.datetime.now()
    return f"{preset}-{now:%Y%m%d-%H%M%S}"


def choose_kernel() -> str:
    """`parlm` when that Jupyter kernel is registered for this very Python environment, else
    `python3` (the environment's own kernel): a `parlm` kernel registered from another checkout
    would silently run other code."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        spec = KernelSpecManager().get_kernel_spec("parlm")
    except (ImportError, NoSuchKernel, OSError, ValueError):
        return "python3"
    if spec.argv and Path(spec.argv[0]).absolute().parent == Path(sys.executable).absolute().parent:
        return "parlm"
    return "python3"


def notebook_marker(stem: str) -> str:
    """The stage-marker name recording that notebook `stem` executed to the end."""
    return f"notebook_{stem}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def execute_notebook(source: Path, output: Path, parameters: dict, plan: RunPlan) -> Path:
    """Execute `source` with papermill into `output`, through a temporary `.running` name.

    On success the executed notebook is renamed to `output` (and a stale `.FAILED` copy from an
    earlier attempt is removed); on failure it becomes `<stem>.FAILED.ipynb` and NotebookFailed
    is raised with the error and that path."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    # Pass only the parameters the notebook declares (01/02/04/06 have no use for `nproc`).
    declared = papermill.inspect_notebook(str(source))
    parameters = {k: v for k, v in parameters.items() if k in declared}
    running = output.with_name(f".{output.stem}.running.ipynb")
    failed = output.with_name(f"{output.stem}.FAILED.ipynb")
    try:
        papermill.execute_notebook(
            str(source), str(running), parameters=parameters, kernel_name=plan.kernel_name,
            progress_bar=plan.progress_bar, log_output=plan.log_output, cwd=str(plan.cwd),
            # ipykernel's own start-up warnings (e.g. about local TCP transport) are noise here.
            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except PapermillExecutionError as exc:
        if running.exists():
            os.replace(running, failed)
        raise NotebookFailed(f"{source.name} failed in cell {exc.cell_index}: {exc.ename}: "
                             f"{exc.evalue}", failed) from None
    except BaseException as exc:  # kernel death, Ctrl-C: keep what ran, never as complete
        if running.exists():
            os.replace(running, failed)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise NotebookFailed(f"{source.name} did not finish: {type(exc).__name__}: {exc}",
                             failed) from exc
    os.replace(running, output)
    if failed.exists():
        failed.unlink()
    return output


def _check_notebooks(plan: RunPlan) -> None:
    stems = [stem for stem, _ in plan.seed_notebooks] + [plan.report_notebook or ""]
    missing = [f"{stem}.ipynb" for stem in stems if stem
               if not (plan.notebook_dir / f"{stem}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"{plan.notebook_dir} lacks {missing}; parlm.run needs a source "
                                f"checkout (pip install -e .) with the notebooks folder")


def prepare_seed(plan: RunPlan, seed: int) -> Config:
    """Resolve and check the seed's config and write (or verify) its `config.yaml` before any
    notebook starts, so a mismatched resume or a bad override fails at once."""
    from parlm.pipeline import prepare_run

    config = Config.from_preset(plan.preset, parse_overrides(plan.overrides)).replace(seed=seed)
    config.validate(world_size=plan.nproc)
    return prepare_run(config, plan.seed_dir(seed))


def _adopt_stage(run_dir: Path, stage: str, started_at: float, notebook: Path) -> None:
    """A notebook that ran its stage function directly (not through parlm.pipeline) leaves no
    marker. It finished without error, so when the stage's result file was written during this
    execution the stage is complete: mark it. Otherwise the notebook did not run its stage."""
    result = runlog.STAGE_RESULT_FILES.get(stage)
    path = run_dir / result if result else None
    if path is not None and path.exists() and path.stat().st_mtime >= started_at - 1.0:
        runlog.mark_stage_done(run_dir, stage)
        _say(f"  (stage '{stage}' marked done: {notebook.name} wrote {result} but left no marker)")
        return
    raise NotebookFailed(f"{notebook.name} finished but stage '{stage}' has no marker in "
                         f"{run_dir / '.stages'} and wrote no {result or 'result file'}; the "
                         f"notebook must run its stage (through parlm.pipeline)", notebook)


def run_seed(plan: RunPlan, seed: int) -> dict:
    """Execute notebooks 01-06 for one seed (skipping finished ones), then its summary.json."""
    from parlm import pipeline

    run_dir = plan.seed_dir(seed)
    config = prepare_seed(plan, seed)
    for index, (stem, stage) in enumerate(plan.seed_notebooks, start=1):
        tag = f"[seed {seed}] {index}/{len(plan.seed_notebooks)} {stem}"
        if runlog.stage_done(run_dir, notebook_marker(stem)):
            _say(f"{tag}: done earlier, skipped")
            continue
        _say(f"{tag}: running{f' (stage {stage})' if stage else ''} -> {run_dir / (stem + '.ipynb')}")
        start, started_at = time.perf_counter(), time.time()
        execute_notebook(plan.notebook_dir / f"{stem}.ipynb", run_dir / f"{stem}.ipynb",
                         plan.seed_parameters(seed), plan)
        if stage is not None and not runlog.stage_done(run_dir, stage):
            _adopt_stage(run_dir, stage, started_at, run_dir / f"{stem}.ipynb")
        runlog.mark_stage_done(run_dir, notebook_marker(stem))
        _say(f"{tag}: finished in {time.perf_counter() - start:.1f} s")
    pipeline.ensure(config, run_dir, "summary", nproc=plan.nproc)
    return runlog.read_json(run_dir / "summary.json")


def run_report(plan: RunPlan) -> Path:
    """Execute 07_report into `runs/<run_id>/report/` (always re-executed: it is cheap and
    reflects every finished seed)."""
    _say(f"[report] {plan.report_notebook} -> {plan.report_dir}")
    return execute_notebook(plan.notebook_dir / f"{plan.report_notebook}.ipynb",
                            plan.report_dir / f"{plan.report_notebook}.ipynb",
                            plan.report_parameters(), plan)


def run(plan: RunPlan) -> int:
    """Execute the plan; return a process exit code (0 when every seed and the report ran)."""
    _check_notebooks(plan)
    plan.run_root.mkdir(parents=True, exist_ok=True)
    invocation = {"preset": plan.preset, "seeds": plan.seeds, "overrides": plan.overrides,
                  "nproc": plan.nproc, "baseline": plan.baseline, "kernel": plan.kernel_name,
                  "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # One record per invocation; the pid keeps concurrent invocations (one seed per GPU) apart.
    runlog.write_json(plan.run_root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json",
                      invocation)
    _say(f"run id: {plan.run_id}  ({plan.run_root})  kernel: {plan.kernel_name}")
    failures = []
    for seed in plan.seeds:
        start = time.perf_counter()
        try:
            summary = run_seed(plan, seed)
        except (NotebookFailed, ConfigError, FileNotFoundError, RuntimeError) as exc:
            where = getattr(exc, "notebook_path", None)
            _say(f"[seed {seed}] FAILED: {exc}" + (f"\n  executed notebook: {where}" if where else ""))
            failures.append(seed)
            if not plan.keep_going:
                _say(f"stopped; finished seeds stay in {plan.run_root}. Fix the error and rerun "
                     f"with --run-id {plan.run_id} to resume.")
                return 1
            continue
        _say(f"[seed {seed}] done in {time.perf_counter() - start:.0f} s: ttt_bpb="
             f"{summary.get('ttt_bpb')} bytes_total={summary.get('bytes_total')}")
    if plan.report_notebook is None:
        return 1 if failures else 0
    try:
        report_notebook = run_report(plan)
    except NotebookFailed as exc:
        _say(f"[report] FAILED: {exc}\n  executed notebook: {exc.notebook_path}")
        return 1
    _say(f"report: {plan.report_dir}  (notebook {report_notebook})")
    table = plan.report_dir / "table.md"
    if table.exists():
        print(table.read_text(), flush=True)
    return 1 if failures else 0


class _PapermillChatter(logging.Filter):
    """Drop papermill's per-cell banners so the streamed output is the stages' own."""

    PREFIXES = ("Executing Cell ", "Ending Cell ", "Input Notebook:", "Output Notebook:",
                "Working directory:", "Executing notebook with kernel:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.PREFIXES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parlm.run",
        description="Execute notebooks 01-06 per seed with papermill into runs/<run_id>/seed_<seed>/, "
                    "then 07_report into runs/<run_id>/report/. Rerun with the same --run-id to "
                    "resume.")
    parser.add_argument("--preset", default="demo", help="demo | proxy | fineweb (parlm/presets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds to run (default: 42 314 999)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (GPUs) for training and evaluation, through torchrun")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one config field (repeatable)")
    parser.add_argument("--run-id", help="run folder name (default: <preset>-<yyyymmdd-hhmmss>); "
                        "an existing id resumes")
    parser.add_argument("--runs-dir", default=str(PROJECT_ROOT / "runs"),
                        help="where run folders live (default: <repo>/runs)")
    parser.add_argument("--baseline", default="pr1858",
                        help="Welch-test baseline for the report: pr1858, a run folder, or none")
    parser.add_argument("--kernel", help="Jupyter kernel (default: parlm if registered for this "
                        "environment, else python3)")
    parser.add_argument("--no-report", action="store_true",
                        help="run the seeds only; a later invocation with the same --run-id and "
                             "all seeds makes the report (e.g. after one invocation per GPU)")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failing seed, go on with the others (exit code still 1)")
    parser.add_argument("--quiet", action="store_true",
                        help="no streamed cell output (stage lines and progress bar only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # The whole resolved config, every seed and the world size, before runs/<id> exists.
        config = Config.from_preset(args.preset, parse_overrides(args.overrides)).validate(world_size=args.nproc)
        for seed in args.seeds:
            config.replace(seed=seed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(set(args.seeds)) != len(args.seeds):
        print(f"error: repeated seed in {args.seeds}", file=sys.stderr)
        return 2
    if not args.quiet:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_PapermillChatter())
        papermill_logger = logging.getLogger("papermill")
        papermill_logger.addHandler(handler)
        papermill_logger.setLevel(logging.INFO)
        papermill_logger.propagate = False
    plan = RunPlan(preset=args.preset, seeds=list(args.seeds),
                   run_id=args.run_id or default_run_id(args.preset),
                   runs_dir=Path(args.runs_dir).resolve(), overrides=list(args.overrides),
                   nproc=args.nproc, baseline=args.baseline,
                   kernel_name=args.kernel or choose_kernel(), log_output=not args.quiet,
                   keep_going=args.keep_going,
                   report_notebook=None if args.no_report else REPORT_NOTEBOOK)
    try:
        return run(plan)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
