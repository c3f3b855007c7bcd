"""parlm: a research workbook reproducing Parameter Golf PR #1858 as tested software.

Stages (each a module with a `python -m parlm.<stage>` entry point): data, train, quant,
eval, ppm, report, run. See README.md and DESIGN.md.
"""
__version__ = "0.1.0"
