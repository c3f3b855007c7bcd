"""The one command line of every stage: `python -m parlm.<stage> --run-dir DIR [--config FILE]
[--preset NAME] [--set KEY=VALUE ...]`.

Each stage's `main()` is `stage_command(prog, description, stage_function, argv)`: parse the
flags, resolve the config (`config_from_arguments`: --config, else <run-dir>/config.yaml, else
--preset, else the defaults; then --set), call `stage_function(config, run_dir)`. An expected
error (a bad setting, a missing input) ends in one line and exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from parlm import dist
from parlm.config import ConfigError, add_config_arguments, config_from_arguments

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, FileExistsError)


def stage_parser(prog: str, description: str, run_dir_help: str) -> argparse.ArgumentParser:
    """The flags every stage takes: --run-dir and the shared --config/--preset/--set."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--run-dir", required=True, help=run_dir_help)
    add_config_arguments(parser)
    return parser


def stage_command(prog: str, description: str, stage_function: Callable, argv: Sequence[str] | None,
                  run_dir_help: str = "run folder (holds config.yaml and the stage's inputs)",
                  user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse `argv`, resolve the config, run `stage_function(config, run_dir)`; return the exit
    code. Errors of USER_ERRORS + `user_errors` print `<prog>: error: <message>` (prefixed by
    the rank under torchrun) and return 1; the process group is closed either way (without the
    final barrier after an error, which the other ranks may never reach)."""
    args = stage_parser(prog, description, run_dir_help).parse_args(argv)
    failed = False
    try:
        stage_function(config_from_arguments(args, args.run_dir), args.run_dir)
    except USER_ERRORS + tuple(user_errors) as error:
        failed = True
        prefix = f"[rank {dist.get_rank()}] " if dist.get_world_size() > 1 else ""
        print(f"{prefix}{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.cleanup(barrier=False if failed else None)
    return 0
