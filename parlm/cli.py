"""The one command line of every stage: `python -m parlm.<stage> --run-dir DIR [--config FILE]
[--preset NAME] [--set KEY=VALUE ...]`.

Each stage's `main()` is `stage_command(prog, description, stage_function, argv)`: parse the
flags, resolve the config (`config_from_arguments`: --config, else <run-dir>/config.yaml, else
--preset, else the defaults; then --set), call `stage_function(config, run_dir)`. An expected
error (a bad setting, a missing input) ends in one line and exit code 1.

A distributed stage (train, eval) also takes `--nproc N` and torchrun's multi-node options
(`--nnodes`, `--node-rank`, `--master-addr/--master-port` or `--rdzv-endpoint`): started outside
torchrun with any of them, it starts itself under torchrun with them, so that on each of several
machines `python -m parlm.train --run-dir DIR --nproc 8 --nnodes 2 --node-rank R --master-addr H`
is the whole command.

A command with flags of its own (the multi-seed report) names them with `add_arguments`; its
function then also gets the parsed flags, `stage_function(config, run_dir, args)`.

`add_run_arguments` holds the flags that `parlm.run` and `parlm.ablate` share.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from parlm import dist, runlog
from parlm.config import ConfigError, add_config_arguments, config_from_arguments

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, FileExistsError)


def stage_parser(prog: str, description: str, run_dir_help: str, run_dir_flag: str = "--run-dir",
                 config_flags: bool = True, distributed: bool = False) -> argparse.ArgumentParser:
    """The flags every stage takes: the run folder (`run_dir_flag`, parsed as `run_dir`) and,
    with `config_flags`, the shared --config/--preset/--set; a distributed stage also --nproc and
    the topology options (dist.add_topology_arguments)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(run_dir_flag, dest="run_dir", metavar=run_dir_flag.lstrip("-").replace("-", "_").upper(),
                        required=True, help=run_dir_help)
    if config_flags:
        add_config_arguments(parser)
    if distributed:
        parser.add_argument("--nproc", type=int, default=None,
                            help="processes (GPUs) on this machine: start under torchrun with them")
        dist.add_topology_arguments(parser)
    return parser


def torchrun_request(args) -> tuple[int, dist.NodeTopology] | None:
    """(nproc, topology) when parsed stage flags ask for a torchrun start that has not happened
    yet (--nproc, or more than one node, outside a torchrun worker), else None."""
    if not hasattr(args, "nproc") or dist.torchrun_environment() is not None:
        return None
    topology = dist.topology_from_arguments(args)
    if args.nproc is None and topology == dist.NodeTopology():
        return None
    return args.nproc or 1, topology


def forwarded_arguments(args) -> list[str]:
    """The stage's own flags again (--run-dir, --config, --preset, --set), for its workers."""
    forwarded = ["--run-dir", str(args.run_dir)]
    forwarded += ["--config", args.config] if args.config else []
    forwarded += ["--preset", args.preset] if args.preset else []
    return forwarded + [part for item in args.overrides for part in ("--set", item)]


def start_under_torchrun(prog: str, args, request: tuple[int, dist.NodeTopology]) -> int:
    """`torchrun <topology> --nproc_per_node=N -m <module of prog> <the stage's flags>`; its exit
    code (1, after one line, when the workers fail: their last lines are already shown)."""
    nproc, topology = request
    try:
        dist.launch_torchrun(prog.split()[-1], forwarded_arguments(args), nproc, topology=topology)
    except RuntimeError as error:
        print(f"{prog}: error: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def user_error_message(error: BaseException, expected: tuple[type[BaseException], ...], run_dir) -> str | None:
    """The one-line message of an error a user can fix: one of `expected`, or an OSError of a
    run folder that cannot be written (runlog.unwritable_message); None for anything else."""
    if isinstance(error, expected):
        return str(error)
    message = runlog.unwritable_message(error, run_dir) if isinstance(error, OSError) else None
    return None if message is None else f"{message}; free space or choose another folder"


def stage_command(prog: str, description: str, stage_function: Callable, argv: Sequence[str] | None,
                  run_dir_help: str = "run folder (holds config.yaml and the stage's inputs)",
                  user_errors: tuple[type[BaseException], ...] = (), distributed: bool = False, *,
                  run_dir_flag: str = "--run-dir",
                  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                  config_flags: bool = True, error_format: str = "{prog}: error: {error}",
                  error_code: int = 1) -> int:
    """Parse `argv`, resolve the config, run `stage_function(config, run_dir)`; return the exit
    code. Errors of USER_ERRORS + `user_errors`, and a run folder that cannot be written
    (`user_error_message`), print `error_format` (`<prog>: error: <message>`, prefixed by the
    rank under torchrun) and return `error_code` (1); the process group is closed either way
    (without the final barrier after an error, which the other ranks may never reach).

    `add_arguments(parser)` adds the command's own flags, and then the call is
    `stage_function(config, run_dir, args)`; without `config_flags` there is no
    --config/--preset/--set and `config` is None. A `distributed` stage asked for torchrun
    (`torchrun_request`) starts itself under it instead (`start_under_torchrun`)."""
    parser = stage_parser(prog, description, run_dir_help, run_dir_flag, config_flags, distributed)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    request = torchrun_request(args)
    if request is not None:
        return start_under_torchrun(prog, args, request)
    own_flags = (args,) if add_arguments is not None else ()
    failed = False
    try:
        config = config_from_arguments(args, args.run_dir) if config_flags else None
        stage_function(config, args.run_dir, *own_flags)
    except USER_ERRORS + tuple(user_errors) + (OSError,) as error:
        message = user_error_message(error, USER_ERRORS + tuple(user_errors), args.run_dir)
        if message is None:
            raise  # not an error the user can fix: a bug, keep the traceback
        failed = True
        prefix = f"[rank {dist.get_rank()}] " if dist.get_world_size() > 1 else ""
        print(prefix + error_format.format(prog=prog, error=message), file=sys.stderr, flush=True)
        return error_code
    finally:
        dist.cleanup(barrier=False if failed else None)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, *, preset_help: str, seeds: Sequence[int],
                      run_id_help: str, runs_dir: str, nproc_help: str, keep_going_help: str) -> None:
    """The flags of a runner of whole seeds (`parlm.run`, `parlm.ablate`): --preset (default
    demo), --seeds, --set, --run-id, --runs-dir, --nproc, --keep-going."""
    parser.add_argument("--preset", default="demo", help=preset_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                        help=f"seeds to run (default: {' '.join(map(str, seeds))})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one config field (repeatable)")
    parser.add_argument("--run-id", help=run_id_help)
    parser.add_argument("--runs-dir", default=runs_dir, help=f"where run folders live (default: {runs_dir})")
    parser.add_argument("--nproc", type=int, default=1, help=nproc_help)
    parser.add_argument("--keep-going", action="store_true", help=keep_going_help)
