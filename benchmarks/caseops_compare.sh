#!/usr/bin/env bash
# CaseOps (PR #1729) against plain SentencePiece on the wiki2015 proxy at equal steps, TTT BPB
# in raw-byte accounting (byte_accounting=sidecar: every dataset divides by the raw UTF-8 bytes
# of its 250 validation documents). Three datasets from the same documents and split:
#   plain    8192-piece tokenizer trained on the train documents        (wiki2015_plain_sp8192)
#   caseops  8192-piece tokenizer trained on the CaseOps train documents (wiki2015_caseops_sp8192)
#   fwtok    the FineWeb-trained tokenizer of the proxy, not retrained   (wiki2015_fwtok_sp8192)
# plain and caseops are trained the same way (python -m parlm.data build --vocab-size 8192), so
# the comparison isolates the transform; fwtok is shown beside them. The script prints each
# validation byte total (the sidecar sum) and checks it against the raw byte count of the
# documents read from the corpus, and checks that eval.json's bytes are the sidecar's.
#     [PARALLEL=3] [PRIOR=DIR] bash benchmarks/caseops_compare.sh ["plain caseops fwtok"] ["42 314"] [STEPS=120] [--set key=value ...]
# Written for the device tool: carry .carry (the corpus .xz and the 8192 tokenizer) and .whl.
# Datasets already built are reused; each run's eval.json and log go to $OUT (default
# runs/caseops_compare_out), the table at the end covers every kind and seed found there. To split
# the runs over several calls, carry an earlier call's *_eval.json files in a folder named by
# PRIOR (ALL_KINDS / ALL_SEEDS name the table's rows when they differ from this call's).
set -u
KINDS=${1:-plain caseops fwtok}; SEEDS=${2:-42 314}; STEPS=${3:-120}
shift $(( $# < 3 ? $# : 3 ))
OUT=${OUT:-runs/caseops_compare_out}
ALL_KINDS=${ALL_KINDS:-$KINDS}; ALL_SEEDS=${ALL_SEEDS:-$SEEDS}
mkdir -p "$OUT"
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
DOCS=.carry/docs_selected.jsonl.xz

build() {  # build KIND: the dataset of one kind, skipped when built
  local kind=$1 name=wiki2015_${1}_sp8192
  [ -f data/datasets/$name/manifest.json ] && return 0
  stamp "build $name"
  case $kind in
    plain) args="--vocab-size 8192 --byte-sidecar" ;;
    caseops) args="--vocab-size 8192 --text-transform caseops" ;;
    fwtok) args="--tokenizer .carry/fineweb_8192_bpe.model --byte-sidecar" ;;
  esac
  /usr/bin/time -f "$name build wall %e s" python3 -m parlm.data build --docs $DOCS --num-val-docs 250 \
    --out data --name $name --tokenizer-out data/tokenizers/${name}.model $args --workers 16 --quiet 2>&1 | tail -5
}

for kind in $ALL_KINDS; do build $kind || exit 1; done
python3 - $ALL_KINDS <<'PY' || exit 1
import json, sys
from parlm.data.corpus import iter_documents
raw = 0
for index, text in enumerate(iter_documents(".carry/docs_selected.jsonl.xz")):
    if index == 250:
        break
    raw += len(text.encode("utf-8"))
print(f"raw UTF-8 bytes of the 250 validation documents: {raw:,}")
for kind in sys.argv[1:]:
    val = json.load(open(f"data/datasets/wiki2015_{kind}_sp8192/manifest.json"))["splits"]["val"]
    verdict = "== raw" if val["sidecar_bytes"] == raw else "!= raw: WRONG"
    print(f"{kind:8s} val tokens {val['tokens']:,} sidecar bytes {val['sidecar_bytes']:,} {verdict} "
          f"(SentencePiece piece bytes {val['scored_bytes']:,})")
    if val["sidecar_bytes"] != raw:
        sys.exit(1)
PY

# run_one KIND SEED: train, quantize and score one model; its eval.json and a log (console lines and
# the training log's summary lines) go to $OUT.
run_one() {
  local kind=$1 seed=$2 name=wiki2015_${1}_sp8192 transform=none
  local run=runs/caseops_compare/${kind}/seed_$seed log=$OUT/${1}_seed${2}.log
  [ $kind = caseops ] && transform=caseops
  SETS="--set dataset_name=$name --set tokenizer_path=./data/tokenizers/${name}.model --set text_transform=$transform
        --set byte_accounting=sidecar --set seed=$seed --set iterations=$STEPS --set max_wallclock_seconds=0 $ANCHORS_SETS"
  { stamp "$kind seed $seed, $STEPS steps"
    python3 -m parlm.train --run-dir $run --preset proxy $SETS "${EXTRA[@]}" 2>&1 | drop_progress | tail -3
    python3 -m parlm.quant --run-dir $run 2>&1 | drop_progress | tail -2
    python3 -m parlm.eval --run-dir $run 2>&1 | drop_progress | tail -4
    grep -E "stopping|peak memory|tok/s" $run/train.log | tail -4
    stamp "$kind seed $seed done"; } > "$log" 2>&1
  cp $run/eval.json "$OUT/${kind}_seed${seed}_eval.json"
}

# PARALLEL runs share the GPU at once (equal steps: the step count, not the clock, ends training;
# an H200 holds three proxy runs of ~40 GiB each).
EXTRA=("$@")
for seed in $SEEDS; do
  for kind in $KINDS; do
    [ -f "$OUT/${kind}_seed${seed}_eval.json" ] && continue
    while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-1}" ]; do wait -n; done
    run_one $kind $seed &
  done
done
wait
for seed in $SEEDS; do for kind in $KINDS; do cat "$OUT/${kind}_seed${seed}.log" 2>/dev/null; done; done
# Results of earlier calls (their $OUT/*_eval.json files, carried back in) join the table.
[ -n "${PRIOR:-}" ] && cp -n "$PRIOR"/*_eval.json "$OUT"/ 2>/dev/null

python3 - "$ALL_KINDS" "$ALL_SEEDS" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from parlm.data.shards import load_validation_byte_counts
from parlm.report.stats import paired_interval
kinds, seeds, out = sys.argv[1].split(), sys.argv[2].split(), Path(sys.argv[3])
bpb = {}
for kind in kinds:
    for seed in seeds:
        path = out / f"{kind}_seed{seed}_eval.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        sidecar = load_validation_byte_counts(f"data/datasets/wiki2015_{kind}_sp8192/fineweb_val_*.bin",
                                              result["tokens"] + 1)
        expected = int(sidecar[1:].sum())
        wired = "raw-byte accounting" if result["bytes"] == expected else \
            f"NOT raw bytes ({result['bytes']:,} != sidecar {expected:,}: byte_accounting is not wired in)"
        bpb[kind, seed] = result["ttt_bpb"]
        print(f"{kind:8s} seed {seed}: ttt_bpb {result['ttt_bpb']:.5f} sliding {result.get('sliding_bpb')} "
              f"bytes {result['bytes']:,} {wired}")
for kind in kinds:
    values = [bpb[kind, s] for s in seeds if (kind, s) in bpb]
    if values:
        print(f"{kind:8s} mean ttt_bpb {sum(values) / len(values):.5f} over {len(values)} seeds")
paired = [s for s in seeds if ("caseops", s) in bpb and ("plain", s) in bpb]
if len(paired) >= 2:
    delta = paired_interval([bpb["caseops", s] for s in paired], [bpb["plain", s] for s in paired])
    per_seed = ", ".join(f"{bpb['caseops', s] - bpb['plain', s]:+.5f}" for s in paired)
    print(f"caseops - plain (paired by seed): {delta.mean:+.5f} BPB, 95% t interval [{delta.low:+.5f}, "
          f"{delta.high:+.5f}] ({delta.n} seeds, df {delta.df:.0f}; per seed {per_seed})")
PY
stamp "done"
