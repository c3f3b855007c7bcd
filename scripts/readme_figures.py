"""The README figures that the code regenerates, printed by the code so they cannot drift.

    python scripts/readme_figures.py            # print them
    python scripts/readme_figures.py --check    # exit 1 when README.md quotes another value

Today one figure: the size in bytes of the generated single-file `train_gpt.py`
(`parlm.submission.build.build_submission_script`), i.e. the bytes_code a run made at this
commit counts. The README quotes it in the sentence matched by QUOTE.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The README's sentence that quotes the figure: "... generated `train_gpt.py` is **31,763 bytes** ...".
QUOTE = re.compile(r"generated `train_gpt\.py` is\s+\*\*([\d,]+) bytes\*\*")


def figures() -> dict[str, int]:
    """{name: value} of every README figure the code regenerates."""
    from parlm.submission.build import build_submission_script

    return {"bytes_code": len(build_submission_script(report={}))}


def check(readme: Path, values: dict[str, int] | None = None) -> list[str]:
    """Problems with the README's quotes (empty when every quote matches `values`, by default
    `figures()`)."""
    quoted = QUOTE.findall(readme.read_text(encoding="utf-8"))
    expected = f"{(values or figures())['bytes_code']:,}"
    if not quoted:
        return [f"{readme}: no sentence quotes the generated train_gpt.py's size "
                f"('generated `train_gpt.py` is **{expected} bytes**')"]
    return [f"{readme}: quotes bytes_code {value}, the code generates {expected}; write {expected}"
            for value in quoted if value != expected]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with README.md's quotes")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README to check")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(Path(args.readme))
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for name, value in figures().items():
        print(f"{name}: {value:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
