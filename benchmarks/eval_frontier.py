"""Paired benchmark of the frontier evaluation switches (issue 21) on one quantized model.

    python benchmarks/eval_frontier.py --run-dir runs/proxy/seed_42 --val-tokens 2097152 --speed-ratio 1.0

Every variant reloads the same artifact and scores the same validation prefix, so seed noise
drops out of the deltas: the #1858 score-first TTT (every switch off), each switch alone, and
all of them together (the frontier preset's values). Per variant it prints BPB (tilted where the
tilt runs), the delta against the #1858 TTT, the evaluation seconds measured here (artifact
load + tilt precompute + TTT, compile warm-up apart) and the planner's projection of the full
validation stream onto `--world-size` H100s (`parlm.eval.budget`; per-token costs scaled from
the prefix to the full stream). Writes the table as JSON (--out). Runs on CPU for the smoke
test (a demo run folder, tiny --context) and on GPU for the real table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from parlm.config import Config, parse_overrides
from parlm.dist import DistContext
from parlm.eval.budget import Target, measured_costs, project
from parlm.eval.scoring import synchronize

OFF = dict(lora_ttt_enabled=False, lora_ttt_no_qv=False, lora_ttt_local_lr_factor=1.0, lora_ttt_short_chunks="",
           lora_ttt_phases=0, tilt_enabled=False, mixture_enabled=False)


def variants(args, base: Config, prefix_docs: int) -> dict[str, dict]:
    """name -> config overrides on top of the run's config with every switch off."""
    seq_len, stride = (int(v) for v in args.context.split(":"))

    def chunk_for(step: int) -> int:  # ttt_chunk_tokens must stay a multiple of stride and L
        return max(step, base.ttt_chunk_tokens // step * step)

    # The context alone keeps the #1858 stride (the chunk TTT scores through it); the frontier
    # takes the long stride too, which only the sliding diagnostic uses once LoRA TTT is on.
    context = dict(eval_seq_len=seq_len, ttt_chunk_tokens=chunk_for(math.lcm(seq_len, base.eval_stride)))
    lora = dict(lora_ttt_enabled=True)
    table = {
        "pr1858_ttt": {},
        "context": context,
        "lora_ttt": lora,
        "lora_no_qv_lr0.75": {**lora, "lora_ttt_no_qv": True, "lora_ttt_local_lr_factor": 0.75},
        "lora_short_chunks": {**lora, "lora_ttt_short_chunks": args.short_chunks},
        "lora_one_phase": {**lora, "lora_ttt_phases": 1, "lora_ttt_prefix_docs": prefix_docs},
        "tilt": {"tilt_enabled": True},
    }
    table["frontier"] = {**{k: v for name in table for k, v in table[name].items()}, "eval_stride": stride,
                         "ttt_chunk_tokens": chunk_for(math.lcm(seq_len, stride))}
    keep = [v for v in args.variants.split(",") if v] or list(table)
    return {name: table[name] for name in keep}


def run_variant(config: Config, artifact: Path, tokens: torch.Tensor, tables, ctx) -> dict:
    """Load the artifact, precompute the tilt, run the configured TTT; eval.json-like dict."""
    from parlm.eval.stage import build_tilt, record_ttt_frontier, run_ttt
    from parlm.quant.artifact import load_quantized_model

    class Quiet:
        def log(self, *_):
            pass

        def metric(self, *_, **__):
            pass

    torch._dynamo.reset()  # each variant compiles its own fresh model: no stale graphs or recompile limit
    synchronize(ctx.device)
    t0 = time.perf_counter()
    model = load_quantized_model(config, artifact, ctx.device)
    synchronize(ctx.device)
    out = {"world_size": 1, "tokens": tokens.numel() - 1, "load_seconds": time.perf_counter() - t0}
    tilt = build_tilt(config, tokens, ctx.device, out, Quiet())
    ttt = run_ttt(config, model, tokens, tables, ctx, tilt, scorer=None)
    out["ttt_seconds"], out["ttt_bpb"] = ttt.result.seconds, ttt.result.bpb
    out["compile_seconds"] = ttt.extra.get("compile_seconds", 0.0)
    record_ttt_frontier(out, config, ttt, tilt, Quiet())
    out["eval_seconds"] = out["load_seconds"] + out.get("tilt_precompute_seconds", 0.0) + out["ttt_seconds"]
    del model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def projection(out: dict, config: Config, full_tokens: int, target: Target) -> float:
    """Projected seconds of this variant on the full stream (per-token costs from the prefix)."""
    scale = full_tokens / out["tokens"]
    scaled = {**out, "tokens": full_tokens, "ttt_seconds": out["ttt_seconds"] * scale,
              "tilt_precompute_seconds": out.get("tilt_precompute_seconds", 0.0) * scale}
    row = project(measured_costs(scaled, config), target, config.ttt_chunk_tokens, config.ttt_epochs,
                  chunk_ttt=out["ttt_method"] == "sgd")
    return row["total_seconds"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="run folder with config.yaml and the artifact")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all variants)")
    parser.add_argument("--val-tokens", type=int, default=2_097_152, help="validation prefix scored (0 = all)")
    parser.add_argument("--context", default="2560:1536",
                        help="eval_seq_len:eval_stride; the context variant takes the length, the frontier both")
    parser.add_argument("--short-chunks", default="256:8,2000:24", help="lora_ttt_short_chunks of its variant")
    parser.add_argument("--prefix-docs", type=int, default=2500,
                        help="phase prefix on the full stream (scaled to the prefix scored)")
    parser.add_argument("--variants", default="", help="comma list (default: all)")
    parser.add_argument("--speed-ratio", type=float, default=1.0, help="this GPU's speed / H100 speed")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--out", default="eval_frontier.json")
    args = parser.parse_args(argv)

    from parlm.data.shards import load_validation_tokens
    from parlm.data.tokenizer import ByteTables
    from parlm.eval.lora_ttt import find_documents
    from parlm.quant.artifact import ARTIFACT_NAME

    run_dir = Path(args.run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = Config.load(run_dir / "config.yaml", {**parse_overrides(args.set), **OFF, "device": device.type})
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    full = load_validation_tokens(base.val_files, base.eval_seq_len, base.val_max_tokens)
    tokens = full if args.val_tokens <= 0 else full[:min(args.val_tokens, full.numel() - 1) + 1]
    full_docs, docs = len(find_documents(full, full.numel() - 1)) - 1, len(find_documents(tokens, tokens.numel() - 1)) - 1
    prefix_docs = max(1, round(args.prefix_docs * min(1.0, docs / max(full_docs, 1))))
    tables = ByteTables.from_tokenizer(base.resolved_tokenizer_path, base.vocab_size)
    target = Target(args.world_size, base.eval_budget_seconds, base.eval_budget_margin, args.speed_ratio)
    rows = []
    for name, overrides in variants(args, base, prefix_docs).items():
        config = base.replace(**overrides).validate()
        out = run_variant(config, run_dir / ARTIFACT_NAME, tokens, tables, ctx)
        out["projection_seconds"] = projection(out, config, full.numel() - 1, target)
        rows.append({"variant": name, "overrides": overrides, **{k: v for k, v in out.items() if not isinstance(v, list)}})
        print(f"{name}: bpb {out['eval_bpb']:.6f} ({out['eval_seconds']:.1f} s)", flush=True)
    reference = next((r["eval_bpb"] for r in rows if r["variant"] == "pr1858_ttt"), rows[0]["eval_bpb"])
    print(f"\n{tokens.numel() - 1} of {full.numel() - 1} validation tokens, {docs} documents, device {device}, "
          f"projection: full stream on {args.world_size}xH100 at speed ratio {args.speed_ratio}")
    print(f"{'variant':<20} {'bpb':>10} {'delta':>10} {'eval s':>9} {'compile s':>9} {'proj s':>9}")
    for row in rows:
        row["delta_vs_pr1858_ttt"] = row["eval_bpb"] - reference
        print(f"{row['variant']:<20} {row['eval_bpb']:>10.6f} {row['delta_vs_pr1858_ttt']:>+10.6f} "
              f"{row['eval_seconds']:>9.1f} {row['compile_seconds']:>9.1f} {row['projection_seconds']:>9.1f}")
    Path(args.out).write_text(json.dumps({"device": str(device), "tokens": tokens.numel() - 1,
                                          "full_tokens": full.numel() - 1, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
