"""The README figures that the code regenerates, printed by the code so they cannot drift.

    python scripts/readme_figures.py            # print them
    python scripts/readme_figures.py --check    # exit 1 when README.md quotes another value

Today: the size in bytes of the generated single-file `train_gpt.py`
(`parlm.submission.build.build_submission_script`), i.e. the bytes_code a run made at this
commit counts, for the PR #1858 defaults (`bytes_code`) and for each preset of PRESETS
(`bytes_code_<preset>`): a script carries only the modules of the switches its config turns
on. The README quotes them in the sentences matched by QUOTE and PRESET_QUOTE.
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
# ... and the presets' figures: "**46,352 bytes** for `--preset frontier`".
PRESET_QUOTE = re.compile(r"\*\*([\d,]+) bytes\*\*\s+for\s+`--preset ([\w-]+)`")
PRESETS = ("frontier", "demo-frontier")


def preset_figure(preset: str) -> str:
    return "bytes_code_" + preset.replace("-", "_")


def figures() -> dict[str, int]:
    """{name: value} of every README figure the code regenerates."""
    from parlm.config import Config
    from parlm.submission.build import build_submission_script

    values = {"bytes_code": len(build_submission_script(report={}))}
    for preset in PRESETS:
        values[preset_figure(preset)] = len(build_submission_script(Config.from_preset(preset)))
    return values


def check(readme: Path, values: dict[str, int] | None = None, required: tuple[str, ...] = ("bytes_code",)) -> list[str]:
    """Problems with the README's quotes (empty when every quote matches `values`, by default
    `figures()`, and each figure in `required` is quoted)."""
    text = readme.read_text(encoding="utf-8")
    values = values or figures()
    quoted = [("bytes_code", value) for value in QUOTE.findall(text)]
    quoted += [(preset_figure(preset), value) for value, preset in PRESET_QUOTE.findall(text)]
    problems = []
    for name in required:
        if name not in {quoted_name for quoted_name, _ in quoted}:
            sentence = (f"generated `train_gpt.py` is **{values[name]:,} bytes**" if name == "bytes_code" else
                        f"**{values[name]:,} bytes** for `--preset {name[len('bytes_code_'):].replace('_', '-')}`")
            problems.append(f"{readme}: no sentence quotes {name}, the generated train_gpt.py's size ('{sentence}')")
    for name, value in quoted:
        if name not in values:
            problems.append(f"{readme}: quotes {name} {value}, a size the code does not generate (PRESETS)")
        elif value != f"{values[name]:,}":
            expected = f"{values[name]:,}"
            problems.append(f"{readme}: quotes {name} {value}, the code generates {expected}; write {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with README.md's quotes (each one required)")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README to check")
    args = parser.parse_args(argv)
    values = figures()
    if args.check:
        problems = check(Path(args.readme), values, required=tuple(values))
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for name, value in values.items():
        print(f"{name}: {value:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
