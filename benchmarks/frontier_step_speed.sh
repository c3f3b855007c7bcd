#!/usr/bin/env bash
# Training-step throughput of the frontier model switches against the PR #1858 base on one GPU
# (issue 17: the frontier preset must stay within 5% of the base's tok/s, peak memory no higher).
# Same model-and-optimizer step as benchmarks/model_step_speed.py, before and after looping:
#   base            Config() defaults, 2048-token rows
#   frontier        + SparseAttnGate, SmearGate, AsymLogit, Polar Express NS, 2048-token rows
#   frontier_1024 / frontier_3072: the progressive-context stages of #2014 (attention cost per
#   token grows with the row length; compare each with base_1024 / base_3072, not with base).
#     bash benchmarks/frontier_step_speed.sh [OUT_DIR]     (about 10 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/frontier_step_speed}
mkdir -p "$out"
switches=(--set sparse_attn_gate_enabled=1 --set sparse_attn_gate_scale=0.5 --set gate_window=12
          --set smear_gate_enabled=1 --set asym_logit_rescale=1
          --set muon_newton_schulz_coefficients=polar_express)
run() { python benchmarks/model_step_speed.py --steps 20 --out "$out/$1.json" "${@:2}"; }
run base
run frontier "${switches[@]}"
for length in 1024 3072; do
  run "base_$length" --set train_seq_len=$length --set rope_train_seq_len=$length
  run "frontier_$length" "${switches[@]}" --set train_seq_len=$length --set rope_train_seq_len=$length
done
python - "$out" <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text())["results"][0] for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
for name, row in rows.items():
    print(name, {k: v for k, v in row.items() if "tok" in k or "mem" in k or "peak" in k})
PY
