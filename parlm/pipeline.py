"""The stage graph of one seed's run folder, and `ensure` to (re)build what is missing.

data -> train -> quant -> eval -> ppm -> summary. Every stage is a function of
(config, run_dir) that writes files into the run folder; a stage counts as done only when its
marker (`.stages/<stage>.done`) exists, which is written after all of its outputs. Notebooks
call `ensure(config, run_dir, "<the stage before theirs>")` so each one also runs alone.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from parlm import runlog
from parlm.config import Config, ConfigError
from parlm.quant.artifact import invalidate_stale_stages

STAGES = ("data", "train", "quant", "eval", "ppm", "summary")
# Stages that use every GPU through torchrun when nproc > 1.
DISTRIBUTED_STAGES = ("train", "eval")


def resumable_change(run_dir: str | os.PathLike, key: str, value) -> bool:
    """Whether a resumed run may change setting `key` to `value`. Only the size cap may change:
    it is the quant stage's pass/fail threshold (the report checks the contest's 16,000,000 bytes
    whatever it is), so a run stopped over the cap can go on without training again. Allowed while
    quant is not done, or when the finished quant's bytes_total fits the new cap too (its verdict
    stands)."""
    if key != "artifact_cap_bytes":
        return False
    if not runlog.stage_done(run_dir, "quant"):
        return True
    quant_path = Path(run_dir) / runlog.STAGE_RESULT_FILES["quant"]
    bytes_total = runlog.read_json(quant_path).get("bytes_total") if quant_path.exists() else None
    return bytes_total is not None and bytes_total <= value


def prepare_run(config: Config, run_dir: str | os.PathLike) -> Config:
    """Create `run_dir` and write its resolved `config.yaml`.

    An existing run folder keeps its config: resuming with different values would mix two
    experiments, so that raises ConfigError naming the differing keys. The exception are changes
    `resumable_change` allows: they are written to config.yaml and printed to stderr."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.exists():
        existing = Config.load(path)
        diff = {k: (v, getattr(config, k)) for k, v in existing.to_dict().items()
                if getattr(config, k) != v}
        allowed = {k: pair for k, pair in diff.items() if resumable_change(run_dir, k, pair[1])}
        refused = {k: pair for k, pair in diff.items() if k not in allowed}
        if refused:
            lines = ", ".join(f"{k}: {a!r} (saved) vs {b!r} (asked)" for k, (a, b) in refused.items())
            raise ConfigError(
                f"{path} already holds a different config ({lines}); use a new run id or "
                f"delete the folder to start over")
        invalidate_stale_stages(run_dir, STAGES)  # a damaged artifact: the stages after train rerun
        if allowed:
            existing = existing.replace(**{k: new for k, (_, new) in allowed.items()})
            existing.save(path)
            for k, (old, new) in allowed.items():
                print(f"{path}: {k} {old!r} -> {new!r}", file=sys.stderr, flush=True)
        return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(path)
    return config


def run_stage(stage: str, config: Config, run_dir: str | os.PathLike, nproc: int = 1) -> None:
    """Run one stage now (in this process, or under torchrun for train/eval with nproc > 1)
    and mark it done."""
    run_dir = Path(run_dir)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    if stage in DISTRIBUTED_STAGES and nproc > 1:
        from parlm.dist import launch_torchrun

        config.check_world_size(nproc)
        launch_torchrun(f"parlm.{stage}", ["--run-dir", str(run_dir)], nproc)
    elif stage == "data":
        from parlm.data.corpus import ensure_dataset

        ensure_dataset(config)
    elif stage == "train":
        from parlm.train.loop import train_run

        train_run(config, run_dir)
    elif stage == "quant":
        from parlm.quant.stage import quantize_run

        quantize_run(config, run_dir)
    elif stage == "eval":
        from parlm.eval.stage import evaluate_run

        evaluate_run(config, run_dir)
    elif stage == "ppm":
        from parlm.ppm import ppm_run

        ppm_run(config, run_dir)
    elif stage == "summary":
        from parlm.report.summary import summarize_seed

        summarize_seed(run_dir)
    runlog.mark_stage_done(run_dir, stage)


def ensure(config: Config, run_dir: str | os.PathLike, upto: str, nproc: int = 1) -> Config:
    """Make every stage up to and including `upto` done, running only the missing ones.

    Returns the run's config (the saved one when the folder already existed)."""
    if upto not in STAGES:
        raise ValueError(f"unknown stage {upto!r}; stages are {STAGES}")
    config = prepare_run(config, run_dir)
    for stage in STAGES[: STAGES.index(upto) + 1]:
        if not runlog.stage_done(run_dir, stage):
            run_stage(stage, config, run_dir, nproc=nproc)
    return config


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The config saved in a run folder (clear error when the folder is not a run)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); run "
                                f"`python -m parlm.run` or parlm.pipeline.ensure first")
    return Config.load(path)
