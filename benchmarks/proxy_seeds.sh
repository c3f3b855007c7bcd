#!/usr/bin/env bash
# `python -m parlm.run --preset $PRESET` (default proxy; papermill, notebooks 01-07) for several seeds on a GPU
# machine, one GPU per seed, the seeds of one GPU one after the other, then the report. Written
# for the device tool: carry .carry (the corpus .xz and the 8192 tokenizer) and .whl (brotli,
# papermill and its dependencies); from the repository root:
#     bash benchmarks/proxy_seeds.sh RUN_ID "42 314" [--set key=value ...]
# Each seed runs under its own Inductor cache folder, so its compile times are cold ones
# (INDUCTOR_CACHE=shared: one folder for all seeds, so later seeds of a GPU reuse the graphs). The
# whole script keeps within CALL_SECONDS (default 590, the device tool's 10-minute call less a
# margin): a seed is stopped when only 60 s remain (or SEED_TIMEOUT seconds after it starts, if
# that comes first), the report step (which first resumes any stopped notebook) gets what then
# remains less 25 s, and the results are packed even when something was stopped. Rerunning the
# same RUN_ID resumes unfinished notebooks. Results (small files of every seed folder and the
# report) are packed into $OUT/RUN_ID.tar.gz, with the logs beside it.
set -u
STARTED=$(date +%s)
left() { echo $(( ${CALL_SECONDS:-590} - ($(date +%s) - STARTED) )); }
RUN_ID=$1; SEEDS=$2; shift 2
PRESET=${PRESET:-proxy}
OUT=${OUT:-runs/${RUN_ID}_out}
mkdir -p "$OUT" && OUT=$(realpath "$OUT")
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
[ "$PRESET" = proxy ] && build_proxy_dataset
GPUS=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')
# Each seed's processes get an equal share of the CPU cores (CPU thread pools of concurrent
# seeds would otherwise each size themselves to the whole machine).
export OMP_NUM_THREADS=$(( $(nproc) / GPUS > 0 ? $(nproc) / GPUS : 1 ))
SEED_LIST=($SEEDS)
stamp "$PRESET: ${#SEED_LIST[@]} seed(s) on $GPUS GPU slot(s): $SEEDS ($(left) s left)"
for ((gpu = 0; gpu < GPUS; gpu++)); do
  mine=()
  for ((i = gpu; i < ${#SEED_LIST[@]}; i += GPUS)); do mine+=("${SEED_LIST[$i]}"); done
  [ ${#mine[@]} -eq 0 ] && continue
  (
    for seed in "${mine[@]}"; do
      limit=$(( $(left) - 60 ))
      if [ -n "${SEED_TIMEOUT:-}" ] && [ "$SEED_TIMEOUT" -lt "$limit" ]; then limit=$SEED_TIMEOUT; fi
      if [ "$limit" -le 0 ]; then stamp "seed $seed skipped: no time left"; continue; fi
      stamp "seed $seed on GPU $gpu (stopped after ${limit}s)"
      cache=/tmp/inductor_${RUN_ID}; [ "${INDUCTOR_CACHE:-per-seed}" = shared ] || cache+=_$seed
      CUDA_VISIBLE_DEVICES=$gpu TORCHINDUCTOR_CACHE_DIR=$cache \
        timeout -s INT -k 20 "$limit" \
        python3 -m parlm.run --preset "$PRESET" --seeds "$seed" --run-id "$RUN_ID" --no-report "$@" \
        > "$OUT/seed_$seed.log" 2>&1
      stamp "seed $seed exit $?"
    done
  ) &
done
wait
report_limit=$(( $(left) - 25 > 1 ? $(left) - 25 : 1 ))
stamp "report (${report_limit}s left for it)"
timeout -s INT -k 5 "$report_limit" \
  python3 -m parlm.run --preset "$PRESET" --seeds $SEEDS --run-id "$RUN_ID" "$@" > "$OUT/report.log" 2>&1
stamp "report exit $?"
tail -30 "$OUT/report.log"
# Small files only: executed notebooks, logs, JSON, metrics, plots, the report folder.
(cd runs && find "$RUN_ID" -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.md' \
  -o -name '*.ipynb' -o -name '*.png' -o -name '*.yaml' -o -name '*.py' -o -name '*.done' \) -size -8M -print0 \
  | tar --null -czf "$OUT/$RUN_ID.tar.gz" -T -)
ls -la "$OUT"
