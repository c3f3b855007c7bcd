"""What the generated `train_gpt.py` runs: train, quantize (counting the script's own size as
the code bytes) and score, in one command.

    python train_gpt.py [KEY=VALUE ...] [--run-dir DIR]
    torchrun --standalone --nproc_per_node=8 train_gpt.py data_dir=./data/ seed=42

KEY=VALUE pairs set Config fields (defaults are the reference's, SPEC Appendix A).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from parlm import dist
from parlm.config import Config, parse_overrides


def main(script_path: str | None = None, argv: list[str] | None = None) -> dict:
    """Train (SPEC 3), quantize on rank 0 with bytes_code = size of `script_path` and the cap
    enforced (SPEC 4), then evaluate on every rank (SPEC 5); outputs go to the run folder
    (default ./logs/seed_<seed>). Returns the eval.json record."""
    parser = argparse.ArgumentParser(
        prog="train_gpt.py", description="Train, quantize and score a parlm model (generated from parlm).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config fields, e.g. data_dir=./data/ seed=42 (defaults: the reference)")
    parser.add_argument("--run-dir", help="output folder (default ./logs/seed_<seed>)")
    args = parser.parse_args(argv)
    config = Config().replace(**parse_overrides(args.overrides))
    run_dir = Path(args.run_dir or f"logs/seed_{config.seed}")
    code_bytes = os.path.getsize(script_path) if script_path else None

    from parlm.eval.stage import evaluate_run
    from parlm.quant.stage import quantize_run
    from parlm.train.loop import train_run

    try:
        train_run(config, run_dir)
        ctx = dist.init_distributed(config.device)
        failure = None
        if ctx.is_main:
            try:
                quant = quantize_run(config, run_dir, code_bytes=code_bytes, statistics=False)
            except Exception as error:  # every rank must learn of it, or they wait forever
                failure = f"{type(error).__name__}: {error}"
        failure = dist.broadcast_object(failure)
        if failure:
            raise SystemExit(f"train_gpt.py: quantization failed: {failure}")
        result = evaluate_run(config, run_dir)
        if ctx.is_main:
            scores = " ".join(f"{k}:{result[k]:.8f}" for k in ("quantized_bpb", "sliding_bpb", "ttt_bpb") if k in result)
            print(f"final {scores} bytes_total:{quant['bytes_total']} (model {quant['bytes_model']} + "
                  f"code {quant['bytes_code']}) cap:{quant['cap']}", flush=True)
        return result
    finally:
        dist.cleanup()
