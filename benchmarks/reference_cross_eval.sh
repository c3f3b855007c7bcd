#!/usr/bin/env bash
# One model, two evaluators. The PR #1858 script trains the ANCHORS proxy model (150 s, EMA 0.97,
# warmup 5), quantizes it and scores it (quantized, sliding window, score-first TTT; PPM off):
# benchmarks/reference_run.sh with EVALUATE=1. parlm then quantizes and scores the same post-EMA
# weights, the script's final_model.pt (parlm's state-dict names and shapes are the reference's),
# so the two quant + evaluation paths are compared on one model, free of training differences:
#     REF_SCRIPT=path bash benchmarks/reference_cross_eval.sh [SEED=42] [OWN_BUDGET_SECONDS]
#     python benchmarks/cross_eval_table.py $OUT/reference_seed42_evaluated.log $OUT/parlm_on_reference_eval.json
# With OWN_BUDGET_SECONDS, parlm also trains its own model with the same settings and the
# reference's data order in that budget (125 s gives ANCHORS' 118 steps on one H100) and takes it
# through quant and evaluation. With two GPUs the reference runs on GPU 0 and parlm on GPU 1
# (parlm's work on the reference's model waits for its final_model.pt); with one, they take turns.
# Results go to $OUT (default runs/cross_eval_out) as each stage finishes. On the device tool
# (carry .carry, .whl and the reference script, REF_SCRIPT=...) the whole does not fit one
# 10-minute call: on two H100s the reference saved its model after 8 minutes (its compile
# warm-up beside parlm's), parlm's own model was trained by then, and the call ended during
# parlm's evaluation of the reference's model; a second call on the still-warm machine ran
# `quant_and_eval` below on both run folders (the script now evaluates parlm's own model before
# it waits for the reference's). The reference's own quantized, sliding and TTT scores need a
# machine without that limit (about 4 more minutes).
set -u
SEED=${1:-42}
OWN_BUDGET=${2:-}
OUT=${OUT:-runs/cross_eval_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
build_proxy_dataset
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
PARLM_GPU=$(( GPUS > 1 ? 1 : 0 ))
PARLM_SETS="--preset proxy --set seed=$SEED $ANCHORS_SETS --set train_log_every=1 --set data_order=rank
  --set artifact_cap_bytes=17000000"
REF_MODEL=.reference/seed$SEED/final_model.pt
REF_LOG=$OUT/reference_seed${SEED}_evaluated.log
rm -f "$REF_MODEL"

# parlm's quant and evaluation of the run folder $1, results to $OUT with prefix $2.
quant_and_eval() {
  stamp "parlm quant + eval of $1"
  CUDA_VISIBLE_DEVICES=$PARLM_GPU python3 -m parlm.quant --run-dir "$1" 2>&1 | drop_progress | tail -4
  CUDA_VISIBLE_DEVICES=$PARLM_GPU python3 -m parlm.eval --run-dir "$1" 2>&1 | drop_progress | tail -6
  save_quant_json "$1" "$OUT/${2}_quant.json"
  cp "$1/eval.json" "$OUT/${2}_eval.json"
}

stamp "reference seed $SEED on GPU 0"
( CUDA_VISIBLE_DEVICES=0 EVALUATE=1 bash benchmarks/reference_run.sh "$OUT" "$SEED" 150 > "$OUT/reference_console.log" 2>&1
  stamp "reference done" ) &
reference=$!
[ "$GPUS" -gt 1 ] || wait $reference

OWN=runs/cross_eval/parlm_seed$SEED
if [ -n "$OWN_BUDGET" ]; then
  stamp "parlm seed $SEED, ${OWN_BUDGET}s, on GPU $PARLM_GPU"
  rm -rf "$OWN"
  CUDA_VISIBLE_DEVICES=$PARLM_GPU python3 -m parlm.train --run-dir "$OWN" $PARLM_SETS \
    --set max_wallclock_seconds=$OWN_BUDGET 2>&1 | drop_progress | tail -3
  cp "$OWN/train.json" "$OUT/parlm_own_train.json"; cp "$OWN/train.log" "$OUT/parlm_own_train.log"
  [ -f "$OWN/final_model.pt" ] && quant_and_eval "$OWN" parlm_own
fi

# final_model.pt is complete once the script logs its size.
until grep -q "^Serialized model:" "$REF_LOG" 2>/dev/null || ! kill -0 $reference 2>/dev/null; do sleep 2; done
if [ -f "$REF_MODEL" ] && grep -q "^Serialized model:" "$REF_LOG"; then
  ON_REF=runs/cross_eval/reference_model_seed$SEED
  rm -rf "$ON_REF"; mkdir -p "$ON_REF"
  ln -s "$PWD/$REF_MODEL" "$ON_REF/final_model.pt"
  # The config parlm.train would resolve from the same flags (parlm's own --preset/--set parsing).
  python3 -c "import argparse, sys; from parlm.config import add_config_arguments, config_from_arguments
parser = argparse.ArgumentParser(); add_config_arguments(parser)
config_from_arguments(parser.parse_args(sys.argv[2:])).save(sys.argv[1])" "$ON_REF/config.yaml" \
    $PARLM_SETS --set max_wallclock_seconds=150
  quant_and_eval "$ON_REF" parlm_on_reference
else
  echo "error: the reference run saved no final_model.pt; see $REF_LOG" >&2
fi
wait $reference
tail -3 "$OUT/reference_console.log"
python3 benchmarks/cross_eval_table.py "$REF_LOG" "$OUT/parlm_on_reference_eval.json" \
  ${OWN_BUDGET:+--own "$OUT/parlm_own_eval.json"}
stamp "done"
