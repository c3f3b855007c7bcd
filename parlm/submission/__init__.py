"""The generated single-file submission: `build` (bundle the package modules a config's
submission needs into one minified, compressed `train_gpt.py` that runs that config by
default), `entry` (what that script runs: train, quantize, score) and `export` (a records
folder shaped like the challenge's).

CLI: `python -m parlm.submission export --run-root runs/<id> --out DIR`,
`python -m parlm.submission build --out FILE [--config FILE] [--preset NAME] [--set KEY=VALUE ...]`.
"""


def export(run_root, out_dir, name=None):
    """Write the records folder of a run (see `parlm.submission.records.export`)."""
    from parlm.submission.records import export as export_records

    return export_records(run_root, out_dir, name)
