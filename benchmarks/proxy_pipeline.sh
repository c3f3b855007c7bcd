#!/usr/bin/env bash
# The whole pipeline on the wiki2015_sp8192 proxy on one GPU machine, stage by stage, with the
# ANCHORS.md short-run settings (150 s budget, EMA 0.97, warmup 5, no periodic validation,
# seed 42 unless `--set seed=N` is given), copying each stage's results to $OUT as soon as it
# finishes so that a time limit still returns what was done. Written for the device tool: carry
# .carry (the corpus .xz and the 8192 tokenizer) and .whl (brotli); run from the repository root:
#     bash benchmarks/proxy_pipeline.sh [extra --set overrides...]
set -u
OUT=${OUT:-runs/proxy_pipeline_out}
mkdir -p "$OUT"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
SEED=42  # the last `--set seed=N` among the arguments wins, as in parlm's own parsing
for arg in "$@"; do [[ $arg == seed=* ]] && SEED=${arg#seed=}; done
RUN=runs/proxy-anchor/seed_$SEED
build_proxy_dataset
cp data/datasets/wiki2015_sp8192/manifest.json "$OUT/" 2>/dev/null
SETS="--set seed=42 --set max_wallclock_seconds=150 $ANCHORS_SETS --set train_log_every=25 $*"
stamp "train"
python3 -m parlm.train --run-dir $RUN --preset proxy $SETS 2>&1 | drop_progress | tail -22
cp $RUN/train.json $RUN/train.log "$OUT/" 2>/dev/null
stamp "quant"
python3 -m parlm.quant --run-dir $RUN 2>&1 | drop_progress | tail -12
save_quant_json $RUN "$OUT/quant.json"
stamp "eval"
python3 -m parlm.eval --run-dir $RUN 2>&1 | drop_progress | tail -14
cp $RUN/eval.json "$OUT/" 2>/dev/null
python3 - "$RUN" "$OUT" <<'PY'
import numpy as np, sys
d = np.load(f"{sys.argv[1]}/nll.npz")
keep = {k: d[k] for k in d.files}
for k in ("target", "prev"):
    keep[k] = keep[k].astype(np.int16)
np.savez_compressed(f"{sys.argv[2]}/nll_compact.npz", **keep)
PY
stamp "done"; ls -la "$OUT"
