"""The reference script's scores of its own model next to parlm's scores of the same weights.

    python benchmarks/cross_eval_table.py REFERENCE_EVALUATED.log PARLM_ON_REFERENCE_eval.json \
        [--own PARLM_OWN_eval.json]

REFERENCE_EVALUATED.log is the console log of `EVALUATE=1 benchmarks/reference_run.sh` (lines
`<stage> val_loss:L val_bpb:B eval_time:Tms`, `stopping_early: ... step: S/...`,
`Serialized model quantized+brotli: N bytes`); the JSON files are parlm eval.json files, with
the matching quant.json and train.json read from beside them when present (`*_eval.json` ->
`*_quant.json`, `*_train.json`). Prints a markdown table of BPB and seconds per stage and of
TTT − sliding, with Δ = parlm − reference, and ANCHORS.md's figures of the reference (seed 42,
118 steps) in the last column. The reference's stage seconds include its compiles; parlm reports
its compile seconds in a row of their own.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SCORE_LINE = re.compile(r"^(\S[\w\- ]*?) val_loss:\s*(\S+) val_bpb:\s*(\S+) eval_time:\s*(\d+)ms", re.M)
STOP_LINE = re.compile(r"stopping_early: \S+ train_time: (\d+)ms step: (\d+)/")
BYTES_LINE = re.compile(r"Serialized model quantized\+\w+: (\d+) bytes")
# shared/reference/ANCHORS.md, "Whole pipeline on the wiki2015_sp8192 proxy, one H100, seed 42".
ANCHORS = {"steps": 118, "prequant_bpb": 1.6749, "quantized_bpb": 1.6784, "sliding_bpb": 1.6794,
           "ttt_bpb": 1.6728, "quantized_seconds": 41.4, "sliding_seconds": 71.9,
           "bytes_model": 15_995_223}
ROWS = ["steps", "prequant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb", "ttt_minus_sliding_bpb",
        "quantized_seconds", "sliding_seconds", "ttt_seconds", "compile_seconds", "bytes_model"]
# the reference's stage names -> parlm's eval.json keys
STAGES = {"quantized": "quantized", "quantized_sliding_window": "sliding", "quantized_ttt": "ttt"}


def reference_scores(path: str | Path) -> dict:
    """{steps, train_seconds, prequant_bpb, bytes_model, <stage>_bpb, <stage>_seconds} from the
    reference's log, stage names translated to parlm's (quantized, sliding, ttt)."""
    text = Path(path).read_text(errors="replace")
    out: dict = {}
    for name, _loss, bpb, milliseconds in SCORE_LINE.findall(text):
        name = name.strip()
        key = "prequant" if name == "pre-quantization post-ema" else STAGES.get(name)
        if key:
            out[f"{key}_bpb"] = float(bpb)
            out[f"{key}_seconds"] = int(milliseconds) / 1000
    stop = STOP_LINE.search(text)
    if stop:
        out["train_seconds"], out["steps"] = int(stop.group(1)) / 1000, int(stop.group(2))
    size = BYTES_LINE.search(text)
    if size:
        out["bytes_model"] = int(size.group(1))
    if "ttt_bpb" not in out:
        print(f"note: {path} has no 'quantized_ttt ... val_bpb' line: the reference's evaluation did not "
              "finish, so its columns are partly blank")
    return out


def parlm_scores(eval_path: str | Path) -> dict:
    """parlm's eval.json, plus bytes_model from the quant.json and steps, prequant_bpb from the
    train.json beside it when present."""
    eval_path = Path(eval_path)
    out = json.loads(eval_path.read_text())
    for stage, keys in (("quant", ("bytes_model",)), ("train", ("steps", "prequant_bpb"))):
        path = eval_path.with_name(eval_path.name.replace("_eval.json", f"_{stage}.json"))
        if path.exists() and path != eval_path:
            result = json.loads(path.read_text())
            out.update({key: result[key] for key in keys})
    return out


def with_ttt_gain(scores: dict) -> dict:
    """A copy of `scores` with ttt_minus_sliding_bpb = ttt_bpb − sliding_bpb when both are there."""
    out = dict(scores)
    if "ttt_bpb" in out and "sliding_bpb" in out:
        out["ttt_minus_sliding_bpb"] = out["ttt_bpb"] - out["sliding_bpb"]
    return out


def table(reference: dict, parlm: dict, own: dict | None = None) -> str:
    """The markdown comparison, one row per ROWS entry; a missing figure prints as a blank."""
    def cell(value, digits):
        if value is None:
            return ""
        return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"

    reference, parlm, anchors = with_ttt_gain(reference), with_ttt_gain(parlm), with_ttt_gain(ANCHORS)
    columns = ["stage", "reference on its model", "parlm on the same weights", "Δ parlm − reference"]
    if own is not None:
        own = with_ttt_gain(own)
        columns.append("parlm's own model")
    columns.append("ANCHORS (reference, seed 42)")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key in ROWS:
        digits = 4 if key.endswith("bpb") else 1
        ref, ours = reference.get(key), parlm.get(key)
        delta = ours - ref if ref is not None and ours is not None else None
        row = [key, cell(ref, digits), cell(ours, digits), cell(delta, digits)]
        if own is not None:
            row.append(cell(own.get(key), digits))
        row.append(cell(anchors.get(key), digits))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_log")
    parser.add_argument("parlm_eval")
    parser.add_argument("--own", help="parlm eval.json of parlm's own model, for a further column")
    args = parser.parse_args()
    reference = reference_scores(args.reference_log)
    print(f"reference: {reference.get('steps')} steps in {reference.get('train_seconds')} s, "
          f"post-EMA {reference.get('prequant_bpb')}")
    own = parlm_scores(args.own) if args.own and Path(args.own).exists() else None
    print(table(reference, parlm_scores(args.parlm_eval), own))


if __name__ == "__main__":
    main()
