"""Write notebooks/07_report.ipynb (outputs stripped) from the cell sources below.

Run from the repository root: `python scripts/write_report_notebook.py`. The notebook is thin:
parameters, then calls into parlm.report / parlm.report.plots (STYLE.md 1).
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

TITLE = """# 07 · Multi-seed report

Puts the seeds of one run side by side: the per-seed table (steps, training time, BPB after each
stage, artifact bytes), mean and sample standard deviation, a **Welch t-test** of the TTT BPB
against a baseline set of seeds (another run folder, or the published PR #1858 seeds recorded in
`parlm/reference/pr1858.json`), the **worst-case `bytes_total`** against the 16,000,000-byte cap,
plots, and the submission folder.

`mix_bpb_legacy` is the PR #1858 PPM byte mixture. It is shown because the reference logs it, but
it is **not a valid BPB**: the mixture is not a normalized distribution (SPEC 6.6, Issue #1872).

Run headless by `python -m parlm.run` (which passes the run folder); run alone it builds (or reuses)
the default seed of `../runs/notebooks`."""

PARAMETERS = """preset = "demo"
run_root = "../runs/notebooks"
report_dir = "../runs/notebooks/report"
seeds = [42]
overrides = []
baseline = "pr1858"
"""

BUILD = """from pathlib import Path

from IPython.display import Image, Markdown, display

from parlm import pipeline
from parlm.report import summary as report
from parlm.config import Config, parse_overrides

run_root = Path(run_root)
for seed in seeds:
    seed_dir = run_root / f"seed_{seed}"
    if (seed_dir / "config.yaml").exists():
        config = pipeline.load_run_config(seed_dir)  # the config the seed ran with
    else:
        config = Config.from_preset(preset, parse_overrides(overrides)).replace(seed=seed)
    pipeline.ensure(config, seed_dir, "summary")

result = report.build_report(run_root, None if baseline in (None, "none") else baseline, report_dir)
display(Markdown(report.markdown_table(result["summaries"], result["statistics"])))"""

STATS = """print(report.format_report(result, table=False))
welch = (result.get("baseline") or {}).get("welch_ttt_bpb")
if welch:
    print(f"ours: {welch['mean_a']:.5f} ± {welch['std_a']:.5f} (n={welch['n_a']}); "
          f"baseline: {welch['mean_b']:.5f} ± {welch['std_b']:.5f} (n={welch['n_b']})")"""

PLOTS_MD = """## Plots
BPB after each valid stage per seed; training loss and live validation BPB overlaid across seeds
(from `metrics.jsonl`); the legacy PPM mixture and its anti-hijack gate per seed (from `ppm.json`).
The PNGs are in `report/plots/`."""

PLOTS = """for name, path in result["plots"].items():
    display(Markdown(f"**{name}**"), Image(filename=path))"""

SUBMISSION = """submission = result["submission"]
if submission.get("exported"):
    folder = Path(submission["path"])
    for item in sorted(folder.iterdir()):
        print(f"{item.name:40s} {item.stat().st_size:>12,d} bytes")
else:
    print(submission.get("reason"))
worst = result["worst_bytes_total"]
print(f"worst-case bytes_total over seeds: {worst:,} "
      f"({'fits' if result['fits_cap'] else 'EXCEEDS'} the {result['artifact_cap_bytes']:,}-byte cap)")"""


def main() -> None:
    notebook = new_notebook()
    parameters = new_code_cell(PARAMETERS)
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [new_markdown_cell(TITLE), parameters, new_code_cell(BUILD),
                      new_code_cell(STATS), new_markdown_cell(PLOTS_MD), new_code_cell(PLOTS),
                      new_markdown_cell("## Submission folder"), new_code_cell(SUBMISSION)]
    notebook.metadata["kernelspec"] = {"name": "parlm", "display_name": "parlm",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    path = Path(__file__).resolve().parents[1] / "notebooks" / "07_report.ipynb"
    nbformat.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
