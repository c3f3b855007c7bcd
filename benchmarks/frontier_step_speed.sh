#!/usr/bin/env bash
# Training throughput of the frontier model switches against the PR #1858 base on one GPU
# (issue 17: the frontier preset within 5% of the base's tok/s, peak memory no higher), through
# benchmarks/train_speed.py (the real Trainer step: loader, DDP wrapper, clip, three optimizers,
# EMA; FLOPs, MFU and the kernel-class breakdown), before and after looping:
#   base       Config() defaults, 2048-token rows
#   frontier   + SparseAttnGate, BOS-fixed SmearGate, AsymLogit, Polar Express NS, 2048-token rows
# Progressive context (#2014) changes the row length, so its stages compare with the base at the
# same length: LENGTHS="1024 3072" adds base_N / frontier_N runs.
#     bash benchmarks/frontier_step_speed.sh [OUT_DIR]     (about 6 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/frontier_step_speed}
mkdir -p "$out"
switches=(--set sparse_attn_gate_enabled=true --set sparse_attn_gate_scale=0.5 --set gate_window=12
          --set smear_gate_enabled=true --set asym_logit_rescale=true
          --set muon_newton_schulz_coefficients=polar_express)
run() {
  python benchmarks/train_speed.py --warmup-steps "${WARMUP:-5}" --steps-before "${STEPS:-20}" \
    --steps-after "${STEPS:-20}" --profile-steps 3 --out "$out/$1.json" "${@:2}" 2>&1 \
    | grep -v -i -E 'warn|USDT' | tail -18
}
run base
run frontier "${switches[@]}"
for length in ${LENGTHS:-}; do
  run "base_$length" --set train_seq_len=$length --set rope_train_seq_len=$length
  run "frontier_$length" "${switches[@]}" --set train_seq_len=$length --set rope_train_seq_len=$length
done
python - "$out" <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
print(f"{'run':<16}{'tok/s before':>14}{'tok/s after':>13}{'MFU before':>12}{'MFU after':>11}{'peak MiB':>10}")
for name, r in rows.items():
    f = r["flops_per_token"]
    print(f"{name:<16}{r['tok_per_sec_before_loop']:>14,.0f}{r['tok_per_sec_after_loop']:>13,.0f}"
          f"{100 * (f['before_loop']['mfu'] or 0):>11.1f}%{100 * (f['after_loop']['mfu'] or 0):>10.1f}%"
          f"{r['peak_memory_allocated_mib']:>10,.0f}")
base = rows.get("base")
for name, r in rows.items():
    ref = rows.get("base" + name[len("frontier"):]) if name.startswith("frontier") else None
    if ref:
        print(f"{name} / {'base' + name[len('frontier'):]}: before {r['tok_per_sec_before_loop'] / ref['tok_per_sec_before_loop']:.3f}, "
              f"after {r['tok_per_sec_after_loop'] / ref['tok_per_sec_after_loop']:.3f}, "
              f"peak {r['peak_memory_allocated_mib'] / ref['peak_memory_allocated_mib']:.3f}")
PY
