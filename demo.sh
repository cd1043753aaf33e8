#!/usr/bin/env bash
# The main job end to end, offline, on data the project makes:
#   generate captioned scenes -> train a tiny ITC+ITM model -> index the held-out images -> search -> evaluate.
# Usage: bash demo.sh [OUT_DIR]     (STEPS=N REFINE=M bash demo.sh: joint and ITM-refinement steps, shorter or longer)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-demo}
STEPS=${STEPS:-}   # empty: the defaults of `retrieval train` (the preset acceptance measures)
REFINE=${REFINE:-}
python3 -m pip install -q -e ".[dev]"

rm -rf "$OUT"
retrieval data synth "$OUT/scenes" -n 6000 --seed 0
retrieval train "$OUT/scenes/train.jsonl" --out "$OUT/model" ${STEPS:+--set steps="$STEPS"} ${REFINE:+--set refine.steps="$REFINE"} \
  --set eval_pairs="$OUT/scenes/heldout.jsonl" --set eval_every=250
retrieval index "$OUT/scenes/images/heldout" --db "$OUT/collection" --checkpoint "$OUT/model"
for q in "a large red circle" "a small green square above a large blue circle" "a yellow cross - small"; do
  echo "== $q"
  retrieval search "$q" --db "$OUT/collection" -k 5
done
echo "== a small green square to the left of a large purple circle (top 16 re-ranked by ITM)"
retrieval search "a small green square to the left of a large purple circle" --db "$OUT/collection" -k 5 --rerank 16
retrieval search "a large red circle to the left of a small blue square" --db "$OUT/collection" -k 24 \
  --html "$OUT/contact_sheet.html"
retrieval eval "$OUT/scenes/heldout.jsonl" --checkpoint "$OUT/model" --rerank 16
echo "contact sheet: $OUT/contact_sheet.html; training log: $OUT/model/log.jsonl"
