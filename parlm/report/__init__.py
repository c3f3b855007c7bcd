"""The multi-seed report: `summary` per-seed summaries, statistics and the report folder,
`plots` its figures. `python -m parlm.report` builds it."""
