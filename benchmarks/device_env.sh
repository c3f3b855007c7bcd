# Shared set-up of the GPU benchmark scripts, sourced from the repository root (device tool:
# carry .carry, the corpus .xz and the 8192 tokenizer, and .whl, wheels the GPU image lacks).
# Exports the run environment, installs the carried wheels once into /tmp/site, and defines
# `stamp` (a timestamped echo), `drop_progress` (an output filter), `build_proxy_dataset`
# (wiki2015_sp8192, skipped when built) and `save_quant_json` (a run's quant.json, small), and sets
# ANCHORS_SETS, the --set flags of ANCHORS.md's short-run settings besides the budget.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -d .whl ] && ! python3 -c 'import papermill, brotli' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

# EMA 0.97, warmup 5, no periodic validation (the budget, 150 s there, is each script's own).
ANCHORS_SETS="--set ema_decay=0.97 --set warmup_steps=5 --set val_loss_every=0"

stamp() { echo "[$(date +%H:%M:%S)] $*"; }
# A filter for console output kept in a device call's short tail: drops warnings and the
# carriage-return-joined tqdm progress updates (lines like '384/16321 [00:00<00:11, ...').
drop_progress() { tr '\r' '\n' | grep -v -i -E 'warn|\[[0-9:]+<[0-9:?]+'; }

build_proxy_dataset() {
  if [ -f data/datasets/wiki2015_sp8192/manifest.json ]; then return 0; fi
  stamp "build proxy dataset"
  /usr/bin/time -f "data build wall %e s" python3 -m parlm.data build --docs .carry/docs_selected.jsonl.xz \
    --tokenizer .carry/fineweb_8192_bpe.model --num-val-docs 250 --out data --name wiki2015_sp8192 \
    --workers 16 --quiet 2>&1 | tail -3
}

# save_quant_json RUN_DIR DEST: RUN_DIR/quant.json without its per-tensor detail (the part that
# makes it large), written to DEST.
save_quant_json() {
  python3 - "$1" "$2" <<'PY'
import json, sys
quant = json.load(open(f"{sys.argv[1]}/quant.json"))
quant.pop("per_tensor", None)
json.dump(quant, open(sys.argv[2], "w"), indent=1)
PY
}
