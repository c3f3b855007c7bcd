#!/usr/bin/env bash
# parlm training only, at the reference's step count and with the reference's data order, for a
# per-step comparison with the reference script's own log (benchmarks/reference_run.sh):
#     bash benchmarks/equal_steps.sh "314 42" [BUDGET_SECONDS=130] [--set key=value ...]
#     python benchmarks/compare_curves.py REF_DIR/reference_seed314.log runs/equal_steps/seed_314/train.log \
#         --noise runs/equal_steps/seed_42/train.log
# The ANCHORS settings (EMA 0.97, warmup 5, no periodic validation, a loss line per step) with
# `data_order=rank`: the reference seeds its data sampler by rank only, so its seeds all see one
# data order; parlm's default order also depends on the seed, which changes the per-step losses
# about as much as another seed does (add --set data_order=seed_and_rank for parlm's order). parlm
# is faster per step than the reference, so the budget is cut to give the reference's step count
# on the same GPU (130 s gives 122-123 steps on one H100, the reference 120 in its 150 s).
# Written for the device tool: carry .carry and .whl. Each seed's train.log, train.json and
# metrics.jsonl are copied to $OUT (default runs/equal_steps_out).
# NPROC=N trains with N processes (torchrun, one GPU each). The global batch stays the same, so
# for the same step count divide the training time, not the 12 s GPTQ reserve, by N: 73 s gave
# 125-126 steps on 2 H100s, 41 s gave 115 on 4 (the 1-GPU 130 s: 122).
set -u
SEEDS=${1:?usage: equal_steps.sh "SEEDS" [BUDGET_SECONDS] [--set key=value ...]}; shift
BUDGET=130
if [ $# -gt 0 ] && [[ $1 != --* ]]; then BUDGET=$1; shift; fi
OUT=${OUT:-runs/equal_steps_out}
mkdir -p "$OUT"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
build_proxy_dataset
for seed in $SEEDS; do
  stamp "seed $seed, ${BUDGET}s"
  launcher="python3"; [ "${NPROC:-1}" -gt 1 ] && launcher="torchrun --standalone --nproc_per_node=$NPROC"
  $launcher -m parlm.train --run-dir runs/equal_steps/seed_$seed --preset proxy --set seed=$seed \
    --set max_wallclock_seconds=$BUDGET $ANCHORS_SETS --set train_log_every=1 --set data_order=rank "$@" \
    2>&1 | drop_progress | tail -4
  for name in train.log train.json metrics.jsonl; do cp runs/equal_steps/seed_$seed/$name "$OUT/seed${seed}_$name"; done
done
stamp "done"
