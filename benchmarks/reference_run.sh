#!/usr/bin/env bash
# Train the PR #1858 reference script itself on the wiki2015_sp8192 proxy with the ANCHORS.md
# settings and a training-loss line every step, for a per-step comparison with parlm:
#     bash benchmarks/reference_run.sh OUT_DIR [SEED=42] [BUDGET_SECONDS=150]
#     bash benchmarks/equal_steps.sh "42 314"   # parlm at the same step count and data order
#     python benchmarks/compare_curves.py OUT_DIR/reference_seed42.log runs/equal_steps/seed_42/train.log
# The script is not part of parlm. It is downloaded from openai/parameter-golf at the PR's final
# commit into .reference/ (ignored; its SHA-256 is checked), or read from REF_SCRIPT=path on a
# machine without internet (carry it there). FlashAttention-3 is replaced by
# benchmarks/fa3_sdpa_shim (SDPA with GQA). The run is stopped once the post-EMA score is logged,
# unless EVALUATE=1: then the script also saves final_model.pt, quantizes, and scores the
# quantized model plainly, with the sliding window and with score-first TTT (PPM off), in its own
# folder .reference/seed<SEED>/ (it writes its bootstrap train_gpt.py into its working folder, so
# it never runs where the script lies); benchmarks/reference_cross_eval.sh uses that model. Needs
# CUDA and the proxy dataset (data/datasets/wiki2015_sp8192 and its tokenizer; README "Proxy data").
set -euo pipefail
OUT_DIR=${1:?usage: reference_run.sh OUT_DIR [SEED] [BUDGET_SECONDS]}
SEED=${2:-42}
BUDGET=${3:-150}
COMMIT=8dc9684dc2e8edc5c0bcfa9882a4a2b19fdadec1
RECORD=records/track_10min_16mb/2026-04-27_ScoreFirstTTT_PPMD_QK525/train_gpt.py
SHA256=997ac92abb04565d68b74419674082ca30e005758cfd19f97c1eca1280e1314f
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATASET=${DATASET:-$ROOT/data/datasets/wiki2015_sp8192}
TOKENIZER=${TOKENIZER:-$ROOT/data/tokenizers/fineweb_8192_bpe.model}
WORK=$ROOT/.reference
mkdir -p "$WORK/data/datasets" "$WORK/data/tokenizers" "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

script=${REF_SCRIPT:-$WORK/train_gpt.py}
if [ ! -f "$script" ]; then
  echo "downloading the reference script (openai/parameter-golf@${COMMIT:0:9})"
  curl -fsSL "https://raw.githubusercontent.com/openai/parameter-golf/$COMMIT/$RECORD" -o "$script.part"
  mv "$script.part" "$script"
fi
echo "$SHA256  $script" | sha256sum -c --quiet - || {
  echo "error: $script is not the PR #1858 final-commit train_gpt.py (SHA-256 differs)" >&2; exit 1; }
[ -f "$DATASET/fineweb_val_000000.bin" ] || {
  echo "error: no proxy dataset at $DATASET; build it first (README, 'Proxy data')" >&2; exit 1; }
[ -f "$TOKENIZER" ] || { echo "error: no tokenizer at $TOKENIZER (set TOKENIZER=...)" >&2; exit 1; }
# The script reads DATA_DIR/datasets/fineweb10B_sp8192 and DATA_DIR/tokenizers/fineweb_8192_bpe.model.
ln -sfn "$DATASET" "$WORK/data/datasets/fineweb10B_sp8192"
ln -sf "$TOKENIZER" "$WORK/data/tokenizers/fineweb_8192_bpe.model"

script=$(cd "$(dirname "$script")" && pwd)/$(basename "$script")
EVALUATE=${EVALUATE:-0}
log=$OUT_DIR/reference_seed$SEED.log
EVAL_ENV="TTT_ENABLED=0 SLIDING_WINDOW_ENABLED=0"
if [ "$EVALUATE" = 1 ]; then EVAL_ENV="TTT_ENABLED=1 SLIDING_WINDOW_ENABLED=1"; log=$OUT_DIR/reference_seed${SEED}_evaluated.log; fi
# The script writes logs/<RUN_ID>.txt, final_model.pt, final_model.int6.ptz and its bootstrap
# train_gpt.py into its working directory: a folder of its own per seed.
mkdir -p "$WORK/seed$SEED" && cd "$WORK/seed$SEED"
env PYTHONPATH="$ROOT/benchmarks/fa3_sdpa_shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  SEED=$SEED RUN_ID=reference_seed$SEED DATA_DIR="$WORK/data/" MAX_WALLCLOCK_SECONDS=$BUDGET \
  EMA_DECAY=0.97 WARMUP_STEPS=5 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1 PPM_ENABLED=0 $EVAL_ENV \
  setsid python3 "$script" > "$log" 2>&1 &
pid=$!
echo "reference seed $SEED, ${BUDGET}s budget, EVALUATE=$EVALUATE: log $log"
# The script runs its work in a child process (its bootstrap), which ignores a signal to the
# parent: stop the whole process group (setsid made pid its leader) once the score is logged.
while kill -0 "$pid" 2>/dev/null; do
  if [ "$EVALUATE" != 1 ] && grep -q "pre-quantization post-ema" "$log"; then
    kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null; break
  fi
  sleep 2
done
wait "$pid" || true
grep -E "layer_loop|val_bpb|stopping_early|peak memory|Serialized model quantized" "$log" || {
  echo "error: the reference run logged no score; see $log" >&2; exit 1; }
