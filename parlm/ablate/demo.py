"""A tiny real ablation, in this process (for the notebook and tests on CPU): the demo preset
trained for a few steps as the base, and paired quantization variants that re-quantize and
re-evaluate the base's weights. The same folder layout and results as `python -m parlm.ablate`,
without papermill (seconds instead of minutes)."""
from __future__ import annotations

from pathlib import Path

from parlm.ablate.dispatch import link_base_checkpoint
from parlm.ablate.results import write_results
from parlm.ablate.variants import build_jobs, load_variants
from parlm.config import Config, parse_overrides

# Seconds per stage on a CPU: small batches, a 2,048-token validation prefix scored plain,
# sliding (stride = context) and by one TTT chunk, no validation during training, no mixture.
DEMO_OVERRIDES = ("val_max_tokens=2048", "val_loss_every=0", "train_batch_tokens=1024", "eval_stride=128",
                  "ttt_chunk_tokens=2048", "mixture_enabled=false", "gptq_calibration_batches=1")


def build_demo_ablation(run_root: str | Path, variants: tuple[str, ...] = ("lqer", "per_group_compression"),
                        seeds: tuple[int, ...] = (42,), steps: int = 4, preset: str = "demo",
                        common: tuple[str, ...] = DEMO_OVERRIDES) -> dict:
    """Run base + `variants` (paired ones only: they reuse the base's weights) x `seeds` up to
    the eval stage into `run_root`, then write ablation.json / ablation.md; returns the result."""
    from parlm import pipeline

    run_root = Path(run_root)
    known = load_variants()
    jobs = build_jobs(known, "base", list(variants), list(seeds), preset, run_root.name, run_root.parent,
                      list(common), steps)
    for job in jobs:
        if job.paired_with:
            link_base_checkpoint(job, run_root / job.paired_with / f"seed_{job.seed}")
        config = Config.from_preset(job.preset, parse_overrides(list(job.overrides))).replace(seed=job.seed)
        pipeline.ensure(config, job.seed_dir, "eval")
    return write_results(run_root, "base", {name: known[name].paired for name in ["base", *variants]})
