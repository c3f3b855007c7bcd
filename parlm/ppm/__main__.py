"""`python -m parlm.ppm`: score an NLL dump with the legacy PR #1858 byte mixture, audit it,
or run the pipeline stage on a run folder.

    python -m parlm.ppm score --npz NLL.npz --tokenizer MODEL --mode legacy [--order 5
        --lambda-hi 0.9 --lambda-lo 0.05 --conf-threshold 0.9 --anti-hijack-nats 0.277
        --subset-tokens N] [--json]
    python -m parlm.ppm score --npz NLL.npz --tokenizer MODEL --mode ppmd --subset-tokens N
    python -m parlm.ppm audit --npz NLL.npz --tokenizer MODEL [--positions 64] [--json]
    python -m parlm.ppm [run] --run-dir DIR [--config CFG | --preset NAME] [--set KEY=VALUE]

`--mode legacy` numbers are NOT a normalized distribution and not a valid BPB (SPEC 6.6);
the JSON carries `normalized: false` and a note. `--mode ppmd` scores the bytes alone with a
true PPM-D + exclusion (a normalized byte model; ~1-2 us/byte, so use a subset).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from parlm.cli import stage_command
from parlm.ppm.bytestream import TokenByteLayout
from parlm.ppm.reference_mixture import NOT_NORMALIZED_NOTE, legacy_mixture
from parlm.ppm.stage import audit_positions, load_nll, ppm_run


def _layout(tokenizer: str, vocab_size: int | None) -> TokenByteLayout:
    from parlm.data.tokenizer import ByteTables

    return TokenByteLayout.from_byte_tables(ByteTables.from_tokenizer(tokenizer, vocab_size))


def _add_stream_arguments(parser) -> None:
    parser.add_argument("--npz", required=True, help="nll.npz with target, prev, nll")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model of the token ids")
    parser.add_argument("--vocab-size", type=int, default=None, help="pad the byte tables to this many ids")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--lambda-hi", type=float, default=0.9)
    parser.add_argument("--lambda-lo", type=float, default=0.05)
    parser.add_argument("--conf-threshold", type=float, default=0.9)
    parser.add_argument("--anti-hijack-nats", type=float, default=0.277, help="<= 0 disables the gate")
    parser.add_argument("--subset-tokens", type=int, default=0, help="first N positions only (0 = all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
        return
    for key, value in obj.items():
        print(f"{key}: {value}")


def _stream(args):
    """(layout, target, prev, nll, kept positions): the --npz dump's first --subset-tokens
    positions (all when <= 0) and the byte layout of --tokenizer."""
    dump = load_nll(args.npz)
    layout = _layout(args.tokenizer, args.vocab_size)
    keep = len(dump["target"]) if args.subset_tokens <= 0 else min(args.subset_tokens, len(dump["target"]))
    return layout, dump["target"][:keep], dump["prev"][:keep], dump["nll"][:keep], keep


def score(args) -> dict:
    """`score`: the legacy mixture's summary (not normalized) or the PPM-D BPB of the bytes."""
    layout, target, prev, nll, keep = _stream(args)
    if args.mode == "legacy":
        result = legacy_mixture(target, prev, nll, layout, order=args.order, lambda_hi=args.lambda_hi,
                                lambda_lo=args.lambda_lo, conf_threshold=args.conf_threshold,
                                anti_hijack_nats=args.anti_hijack_nats, trace_max=0,
                                progress=not args.json)
        out = result.summary()
        out["subset_tokens"] = keep
        return out
    from parlm.ppm.ppmd import ppmd_score

    started = time.perf_counter()
    stream = layout.byte_stream(target, prev, nll)
    result = ppmd_score(stream.values, order=args.order)
    nn_bpb = float(-stream.nn_logp.sum() / len(stream) / np.log(2)) if len(stream) else 0.0
    return {"ppmd_bpb": result.bpb, "nn_only_bpb": nn_bpb, "bytes": len(stream),
            "seconds": time.perf_counter() - started, "order": args.order, "subset_tokens": keep,
            "normalized": True,
            "note": "PPM-D (method D, exclusion) over the SPEC 6.2 byte stream, bytes alone; "
                    "nn_only_bpb is the legacy per-byte spread (not a byte distribution)"}


def audit(args) -> dict:
    """`audit`: the legacy mixture's implied totals at --positions sampled positions."""
    from parlm.ppm.reference_mixture import audit_legacy

    layout, target, prev, nll, _ = _stream(args)
    positions = audit_positions(layout.byte_counts(target, prev), args.positions)
    result = audit_legacy(target, prev, nll, layout, positions, order=args.order,
                          lambda_hi=args.lambda_hi, lambda_lo=args.lambda_lo,
                          conf_threshold=args.conf_threshold, anti_hijack_nats=args.anti_hijack_nats)
    out = result.summary()
    out["note"] = NOT_NORMALIZED_NOTE + "; a normalized model would give 1 for every total"
    return out


STAGE_DESCRIPTION = ("Run the ppm stage on a run folder: the legacy PR #1858 byte mixture over "
                     "its nll.npz, with the normalization audit; writes ppm.json and ppm_trace.npz.")


def main(argv=None) -> int:
    """`python -m parlm.ppm {score,audit,run}` (module docstring). The stage, `run --run-dir DIR`
    or, like every stage, `--run-dir DIR` alone, goes through parlm.cli.stage_command (an error
    a user can fix: one line, exit code 1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"] or (argv and argv[0].startswith("--run-dir")):
        run = argv[:1] == ["run"]
        return stage_command("python -m parlm.ppm" + (" run" if run else ""), STAGE_DESCRIPTION,
                             ppm_run, argv[1:] if run else argv,
                             run_dir_help="run folder holding config.yaml and nll.npz")
    parser = argparse.ArgumentParser(prog="python -m parlm.ppm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    score_parser = commands.add_parser("score", help="score an NLL dump (legacy mixture or PPM-D)")
    _add_stream_arguments(score_parser)
    score_parser.add_argument("--mode", choices=("legacy", "ppmd"), default="legacy")
    audit_parser = commands.add_parser("audit", help="implied total probability of the legacy mixture")
    _add_stream_arguments(audit_parser)
    audit_parser.add_argument("--positions", type=int, default=64)
    # Listed for --help; `run` itself was handed to stage_command above.
    commands.add_parser("run", help="the pipeline stage on a run folder (run --help)")
    args = parser.parse_args(argv)
    _print(score(args) if args.command == "score" else audit(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
