"""`python -m parlm.submission {export,build}`: the records folder of a run, or just the
generated train_gpt.py with its size report."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parlm.submission", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a records folder (README, submission.json, logs, train_gpt.py)")
    export.add_argument("--run-root", required=True, help="run folder holding seed_<n>/ folders (runs/<id>)")
    export.add_argument("--out", required=True, help="records folder to write (new, empty, or an earlier export)")
    export.add_argument("--name", help="submission name (default: parlm <run id>)")
    build = commands.add_parser("build", help="write the generated train_gpt.py and print its size report")
    build.add_argument("--out", required=True, help="file to write (never inside the parlm sources)")
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

    report: dict = {}
    script = build_submission_script(report=report)
    path = write_generated_file(args.out, script)
    print(json.dumps({"path": str(path), "bytes": len(script), **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
