"""Ablation runner: every (variant, seed) through the normal per-seed pipeline, and each
variant's delta against the base with a 95% interval over seeds (issue 17).

    python -m parlm.ablate --preset P --base NAME --variants A,B,... --seeds 42 314
                           [--steps N | --set max_wallclock_seconds=S] [--run-id ID]
                           [--keep-going] [--executor local|slurm|submitit-local] [--jobs-per-gpu K]

- `variants`: the named override sets of `variants.yaml` (beside this file) and the job list;
- `dispatch`: one `python -m parlm.run ... --run-id ID/<variant> --no-report` per job through
  an existing engine (concurrent.futures locally, one slot per GPU x jobs-per-GPU; submitit's
  LocalExecutor or SLURM AutoExecutor), and the paired reuse of the base checkpoint;
- `results`: the per-stage delta table (Welch / paired t intervals from scipy.stats), written
  to runs/<id>/ablation.json and ablation.md.
"""
