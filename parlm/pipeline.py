"""The stages of one seed's run folder, and the one place that runs them.

data -> train -> quant -> eval -> ppm -> summary. A stage is a plain function
`stage(config, run_dir)` that reads its inputs from the run folder and writes its outputs
there; it never imports this module (docs/architecture.md, "Stage contract"). This module alone
prepares a run folder (`prepare_run`), keeps the stage markers (`.stages/<stage>.done`, written
after all of a stage's outputs), launches stages in a child process or under torchrun, and
holds the table of stages. Notebooks start their stage with one call, `stage(...)`.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from parlm import dist, runlog
from parlm.config import PROJECT_ROOT, Config, parse_overrides
from parlm.quant.artifact import invalidate_stale_stages


class StageEntry(NamedTuple):
    """Where a stage's function lives and how it is launched."""

    module: str  # the module holding the stage function
    function: str  # its name: function(config, run_dir)
    distributed: bool  # runs on every GPU under torchrun when nproc > 1 or on several nodes
    child_process: bool = False  # a notebook runs it as `python -m parlm.<stage>` (nproc 1 too)


# In run order. Training runs in a child process from a notebook so the kernel stays small and
# its log streams live; the other stages run in the notebook's own process.
STAGE_TABLE: dict[str, StageEntry] = {
    "data": StageEntry("parlm.data.corpus", "data_stage", distributed=False),
    "train": StageEntry("parlm.train.loop", "train_run", distributed=True, child_process=True),
    "quant": StageEntry("parlm.quant.stage", "quantize_run", distributed=False),
    "eval": StageEntry("parlm.eval.stage", "evaluate_run", distributed=True),
    "ppm": StageEntry("parlm.ppm.stage", "ppm_run", distributed=False),
    "summary": StageEntry("parlm.report.summary", "summary_stage", distributed=False),
}
STAGES = tuple(STAGE_TABLE)
DISTRIBUTED_STAGES = tuple(name for name, entry in STAGE_TABLE.items() if entry.distributed)


def project_path(path: str | os.PathLike) -> Path:
    """`path` as an absolute path; a relative one is taken from the project root (the checkout),
    so a notebook lands in <repo>/runs/... whatever folder it is run from."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def _check_stage(stage: str) -> StageEntry:
    if stage not in STAGE_TABLE:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    return STAGE_TABLE[stage]


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
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        runlog.save_config(config, path)
        return config
    existing = Config.load(path)
    differences = runlog.config_differences(existing, config)
    allowed = {k: pair for k, pair in differences.items() if resumable_change(run_dir, k, pair[1])}
    refused = {k: pair for k, pair in differences.items() if k not in allowed}
    if refused:
        raise runlog.mismatch_error(path, refused)
    invalidate_stale_stages(run_dir, STAGES)  # a damaged artifact: the stages after train rerun
    if allowed:
        existing = existing.replace(**{k: new for k, (_, new) in allowed.items()})
        runlog.save_config(existing, path)
        for k, (old, new) in allowed.items():
            print(f"{path}: {k} {old!r} -> {new!r}", file=sys.stderr, flush=True)
    return existing


def world_size(nproc: int) -> int:
    """Processes of a distributed stage: `nproc` per node times the nodes of the topology that
    `parlm.run` exported (dist.NodeTopology.from_environment; one node by default)."""
    return nproc * dist.NodeTopology.from_environment().nnodes


def launch(stage: str, run_dir: str | os.PathLike, nproc: int = 1, echo: bool = True,
           topology: dist.NodeTopology | None = None) -> None:
    """Run `python -m parlm.<stage> --run-dir DIR` in a child process (under torchrun with
    `nproc` processes per node when the world is larger than one), streaming its output;
    RuntimeError with its last lines when it fails. The child reads the run folder's config.yaml.
    `topology` defaults to the exported one (dist.NodeTopology.from_environment)."""
    arguments = ["--run-dir", str(run_dir)]
    topology = topology or dist.NodeTopology.from_environment()
    if nproc * topology.nnodes > 1:
        dist.launch_torchrun(f"parlm.{stage}", arguments, nproc, echo=echo, topology=topology)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Idle OpenMP threads sleep instead of spinning: on a busy few-core machine spinning
    # threads slow CPU training by an order of magnitude.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    dist.stream_subprocess([sys.executable, "-m", f"parlm.{stage}", *arguments], env, echo)


def run_stage(stage: str, config: Config, run_dir: str | os.PathLike, nproc: int = 1,
              child_process: bool = False, echo: bool = True) -> None:
    """Run one stage now and mark it done: under torchrun for a distributed stage with a world
    larger than one (`world_size`), as a child process when `child_process` and the table says
    so, else by calling its function in this process."""
    entry = _check_stage(stage)
    run_dir = Path(run_dir)
    if entry.distributed and world_size(nproc) > 1:
        config.check_world_size(world_size(nproc))
        launch(stage, run_dir, nproc, echo=echo)
    elif child_process and entry.child_process:
        launch(stage, run_dir, echo=echo)
    else:
        function = getattr(importlib.import_module(entry.module), entry.function)
        function(config, run_dir)
    runlog.mark_stage_done(run_dir, stage)


def ensure(config: Config, run_dir: str | os.PathLike, upto: str, nproc: int = 1) -> Config:
    """Make every stage up to and including `upto` done, running only the missing ones.

    Returns the run's config (the saved one when the folder already existed)."""
    _check_stage(upto)
    config = prepare_run(config, run_dir)
    for name in STAGES[: STAGES.index(upto) + 1]:
        if not runlog.stage_done(run_dir, name):
            run_stage(name, config, run_dir, nproc=nproc)
    return config


def resolve_config(preset: str, seed: int, overrides: Sequence[str] = ()) -> Config:
    """The config of one seed: the preset, then the `key=value` overrides, then the seed."""
    return Config.from_preset(preset, parse_overrides(list(overrides))).replace(seed=seed)


def stage(preset: str, run_dir: str | os.PathLike, seed: int, overrides: Sequence[str], name: str,
          nproc: int = 1, redo: bool = False, settings: dict | None = None,
          echo: bool = True) -> Config:
    """A notebook's one call: prepare the run folder (a relative `run_dir` is taken from the
    project root), make the stages before `name` done, then run `name` unless it is done
    already (`redo=True` runs it again and clears the markers of the stages after it). Returns
    the run's config.

    `settings` are config values for this stage's own process only, never saved to config.yaml
    (e.g. a diagnostic switch); they apply when the stage runs in this process (nproc 1)."""
    entry = _check_stage(name)
    run_dir = project_path(run_dir)
    config = resolve_config(preset, seed, overrides)
    config.validate(world_size=world_size(nproc))
    config = prepare_run(config, run_dir)
    if STAGES.index(name) > 0:
        ensure(config, run_dir, STAGES[STAGES.index(name) - 1], nproc=nproc)
    if redo:
        for later in STAGES[STAGES.index(name):]:
            runlog.stage_marker(run_dir, later).unlink(missing_ok=True)
    if runlog.stage_done(run_dir, name):
        print(f"{name} stage already done in {run_dir}; showing its results "
              f"(redo=True runs it again)", flush=True)
        return config
    in_process = config.replace(**settings) if settings and not (entry.distributed and world_size(nproc) > 1) else config
    run_stage(name, in_process, run_dir, nproc=nproc, child_process=True, echo=echo)
    return config


def join_distributed_stages(run_dir: str | os.PathLike, nproc: int, topology: dist.NodeTopology,
                            echo: bool = True) -> list[str]:
    """On a node of rank > 0 of a job of several nodes: this node's workers of every distributed
    stage not yet done, in order (train, then eval), each a torchrun launch with `topology` that
    waits at the rendezvous until node 0 starts the same stage. Node 0 runs every stage (the
    notebooks) and writes the markers; the run folder must be on a file system every node sees.
    Returns the stages joined."""
    if topology.node_rank == 0:
        raise ValueError("node 0 runs the stages itself (parlm.run); only nodes of rank > 0 join")
    joined = []
    for name in DISTRIBUTED_STAGES:
        if not runlog.stage_done(run_dir, name):
            launch(name, run_dir, nproc, echo=echo, topology=topology)
            joined.append(name)
    return joined


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The config saved in a run folder (clear error when the folder is not a run)."""
    path = project_path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); run "
                                f"`python -m parlm.run` or parlm.pipeline.stage first")
    return Config.load(path)

