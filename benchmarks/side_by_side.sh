#!/usr/bin/env bash
# parlm's training throughput and the PR #1858 reference script's, on the same GPU in one call,
# so every figure is a ratio measured side by side (issue: training throughput toward the hardware):
#     bash benchmarks/side_by_side.sh OUT_DIR [BUDGET_SECONDS=150]
# 1. the reference script trains on the wiki2015_sp8192 proxy with the ANCHORS settings and a
#    loss line every step (benchmarks/reference_run.sh, FA3 replaced by SDPA); its steady-state
#    tok/s before and after looping come from its logged cumulative rates
#    (benchmarks/compare_curves.py steady_rates);
# 2. benchmarks/train_speed.py on parlm's default config (tok/s, FLOPs, MFU, kernel breakdown);
# 3. a table of both with the ratios and the issue's targets (parlm before looping >= 1.5x the
#    reference's; parlm after looping >= 0.78x its own before-looping rate).
# Written for the device tool: carry .carry (corpus .xz, 8192 tokenizer), .whl and .reference
# (the reference script, REF_SCRIPT; its SHA-256 is checked).
set -u
OUT_DIR=${1:?usage: side_by_side.sh OUT_DIR [BUDGET_SECONDS]}; BUDGET=${2:-150}
mkdir -p "$OUT_DIR"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
build_proxy_dataset || exit 1
mkdir -p data/tokenizers && cp -n .carry/fineweb_8192_bpe.model data/tokenizers/ 2>/dev/null
stamp "reference script, ${BUDGET} s"
REF_SCRIPT=${REF_SCRIPT:-.reference/train_gpt.py} bash benchmarks/reference_run.sh "$OUT_DIR" 42 "$BUDGET" | tail -8 || exit 1
stamp "parlm train_speed"
python3 benchmarks/train_speed.py --out "$OUT_DIR/train_speed.json" 2>&1 | drop_progress | tail -22
stamp "table"
python3 - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from compare_curves import steady_rates, train_records
from parlm.config import Config
out = Path(sys.argv[1])
parlm = json.loads((out / "train_speed.json").read_text())
reference = steady_rates(train_records(out / "reference_seed42.log"), Config().train_batch_tokens)
rows = [("before looping", parlm["tok_per_sec_before_loop"], reference["before_looping"]),
        ("after looping", parlm["tok_per_sec_after_loop"], reference["after_looping"])]
print(f"device {parlm['device']}, torch {parlm['torch']}; steady-state tok/s (one GPU)")
print(f"{'phase':<16}{'parlm':>12}{'reference':>12}{'parlm/ref':>11}")
for name, ours, theirs in rows:
    ratio = f"{ours / theirs:.3f}" if ours and theirs else "-"
    print(f"{name:<16}{ours or 0:>12,.0f}{theirs or 0:>12,.0f}{ratio:>11}")
before, after = rows[0][1], rows[1][1]
print(f"parlm after/before looping {after / before:.3f} (target >= 0.78); "
      f"reference after/before {reference['after_looping'] / reference['before_looping']:.3f}")
print(f"parlm before looping / reference {before / reference['before_looping']:.3f} (target >= 1.5)")
print(f"parlm MFU before/after {100 * parlm['flops_per_token']['before_loop']['mfu']:.1f}% / "
      f"{100 * parlm['flops_per_token']['after_loop']['mfu']:.1f}%, peak allocated "
      f"{parlm['peak_memory_allocated_mib']:,.0f} MiB")
json.dump({"parlm": {k: parlm[k] for k in ("tok_per_sec_before_loop", "tok_per_sec_after_loop",
                                           "peak_memory_allocated_mib", "device", "torch")},
           "reference_steady": reference}, open(out / "side_by_side.json", "w"), indent=1)
PY
grep -E "peak memory" "$OUT_DIR/reference_seed42.log" | tail -1
stamp done
