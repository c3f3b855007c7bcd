"""`python -m parlm.submission {export,build}`: the records folder of a run, or just the
generated train_gpt.py of a config with its size report.

    python -m parlm.submission build --out train_gpt.py [--config FILE] [--preset NAME] [--set KEY=VALUE ...]

The script carries the switch modules that config turns on and runs that config by default."""
from __future__ import annotations

import argparse
import json
import sys

from parlm.config import ConfigError, add_config_arguments, config_from_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parlm.submission", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a records folder (README, submission.json, logs, train_gpt.py)")
    export.add_argument("--run-root", required=True, help="run folder holding seed_<n>/ folders (runs/<id>)")
    export.add_argument("--out", required=True, help="records folder to write (new, empty, or an earlier export)")
    export.add_argument("--name", help="submission name (default: parlm <run id>)")
    build = commands.add_parser("build", help="write the generated train_gpt.py of a config and print its size report")
    build.add_argument("--out", required=True, help="file to write (never inside the parlm sources)")
    add_config_arguments(build)
    args = parser.parse_args(argv)
    if args.command == "export":
        from parlm.submission.records import ExportError, export as export_records

        try:
            summary = export_records(args.run_root, args.out, args.name)
        except ExportError as error:
            print(f"parlm.submission: error: {error}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}: val_bpb {summary['val_bpb']} worst-case bytes_total "
              f"{summary['bytes_total']:,} (code {summary['bytes_code']:,}) of cap {summary['cap']:,}")
        return 0
    from parlm.submission.build import build_submission_script, write_generated_file

    try:
        config = config_from_arguments(args)
    except ConfigError as error:
        print(f"parlm.submission: error: {error}", file=sys.stderr)
        return 1
    report: dict = {}
    script = build_submission_script(config, report=report)
    path = write_generated_file(args.out, script)
    print(json.dumps({"path": str(path), "bytes": len(script), **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
