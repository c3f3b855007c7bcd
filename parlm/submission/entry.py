"""What the generated `train_gpt.py` runs: train, quantize (counting the script's own size as
the code bytes) and score, in one command.

    python train_gpt.py [KEY=VALUE ...] [--run-dir DIR]
    torchrun --standalone --nproc_per_node=8 train_gpt.py data_dir=./data/ seed=42

KEY=VALUE pairs set Config fields; the defaults are the config the script was generated for
(the reference's, SPEC Appendix A, plus the settings the generator baked in). A script carries
only the switch modules its config uses (parlm.submission.build.SWITCH_MODULES), so a
KEY=VALUE that turns on a switch it lacks stops it at once, saying how to regenerate it.
"""
from __future__ import annotations

import argparse
import ast
import os
import shlex
from pathlib import Path

from parlm import dist
from parlm.config import Config, parse_overrides


def refuse_absent_switches(config: Config, absent: dict[str, str], settings: dict, overrides: dict) -> None:
    """SystemExit with one line when `config` makes the predicate of a switch module that the
    script was generated without true (`absent`: module -> predicate over Config fields, see
    parlm.submission.build.SWITCH_MODULES): it names the KEY=VALUE pairs that turned each such
    switch on, its module, and the command that generates a script carrying them (the
    script's `settings` plus the `overrides`, each a --set)."""
    values, needs = config.to_dict(), []
    for module, predicate in sorted(absent.items()):
        if eval(compile(predicate, module, "eval"), {"__builtins__": {}}, dict(values)):
            names = {node.id for node in ast.walk(ast.parse(predicate, mode="eval")) if isinstance(node, ast.Name)}
            needs.append(" ".join(f"{key}={overrides[key]}" for key in sorted(names & set(overrides)))
                         + f" needs {module}")
    if needs:
        sets = " ".join(f"--set {shlex.quote(f'{key}={value}')}" for key, value in
                        sorted({**settings, **overrides}.items()) if key not in ("seed", "run_id"))
        raise SystemExit(f"train_gpt.py: error: {'; '.join(needs)}, which this script was generated without; "
                         f"regenerate it: python -m parlm.submission build --out train_gpt.py {sets}")


def main(script_path: str | None = None, argv: list[str] | None = None, settings: dict | None = None,
         absent: dict[str, str] | None = None) -> dict:
    """Train (SPEC 3), quantize on rank 0 with bytes_code = size of `script_path` and the cap
    enforced (SPEC 4), then evaluate on every rank (SPEC 5); outputs go to the run folder
    (default ./logs/seed_<seed>). The config is Config() with `settings` (the generated
    script's baked ones), then the KEY=VALUE pairs of `argv`; a pair that needs a module of
    `absent` stops it first (`refuse_absent_switches`). Returns the eval.json record."""
    parser = argparse.ArgumentParser(
        prog="train_gpt.py", description="Train, quantize and score a parlm model (generated from parlm).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config fields, e.g. data_dir=./data/ seed=42 (defaults: the generated config)")
    parser.add_argument("--run-dir", help="output folder (default ./logs/seed_<seed>)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    config = Config().replace(**{**(settings or {}), **overrides})
    refuse_absent_switches(config, absent or {}, settings or {}, overrides)
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
