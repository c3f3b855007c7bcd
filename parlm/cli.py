"""The one command line of every stage: `python -m parlm.<stage> --run-dir DIR [--config FILE]
[--preset NAME] [--set KEY=VALUE ...]`.

Each stage's `main()` is `stage_command(prog, description, stage_function, argv)`: parse the
flags, resolve the config (`config_from_arguments`: --config, else <run-dir>/config.yaml, else
--preset, else the defaults; then --set), call `stage_function(config, run_dir)`. An expected
error (a bad setting, a missing input) ends in one line and exit code 1.

A command with flags of its own (the multi-seed report) names them with `add_arguments`; its
function then also gets the parsed flags, `stage_function(config, run_dir, args)`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from parlm import dist
from parlm.config import ConfigError, add_config_arguments, config_from_arguments

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, FileExistsError)


def stage_parser(prog: str, description: str, run_dir_help: str, run_dir_flag: str = "--run-dir",
                 config_flags: bool = True) -> argparse.ArgumentParser:
    """The flags every stage takes: the run folder (`run_dir_flag`, parsed as `run_dir`) and,
    with `config_flags`, the shared --config/--preset/--set."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(run_dir_flag, dest="run_dir", metavar=run_dir_flag.lstrip("-").replace("-", "_").upper(),
                        required=True, help=run_dir_help)
    if config_flags:
        add_config_arguments(parser)
    return parser


def stage_command(prog: str, description: str, stage_function: Callable, argv: Sequence[str] | None,
                  run_dir_help: str = "run folder (holds config.yaml and the stage's inputs)",
                  user_errors: tuple[type[BaseException], ...] = (), *, run_dir_flag: str = "--run-dir",
                  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                  config_flags: bool = True, error_format: str = "{prog}: error: {error}",
                  error_code: int = 1) -> int:
    """Parse `argv`, resolve the config, run `stage_function(config, run_dir)`; return the exit
    code. Errors of USER_ERRORS + `user_errors` print `error_format` (`<prog>: error: <message>`,
    prefixed by the rank under torchrun) and return `error_code` (1); the process group is
    closed either way (without the final barrier after an error, which the other ranks may
    never reach).

    `add_arguments(parser)` adds the command's own flags, and then the call is
    `stage_function(config, run_dir, args)`; without `config_flags` there is no
    --config/--preset/--set and `config` is None."""
    parser = stage_parser(prog, description, run_dir_help, run_dir_flag, config_flags)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    own_flags = (args,) if add_arguments is not None else ()
    failed = False
    try:
        config = config_from_arguments(args, args.run_dir) if config_flags else None
        stage_function(config, args.run_dir, *own_flags)
    except USER_ERRORS + tuple(user_errors) as error:
        failed = True
        prefix = f"[rank {dist.get_rank()}] " if dist.get_world_size() > 1 else ""
        print(prefix + error_format.format(prog=prog, error=error), file=sys.stderr, flush=True)
        return error_code
    finally:
        dist.cleanup(barrier=False if failed else None)
    return 0
