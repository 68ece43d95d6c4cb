#!/usr/bin/env bash
# BANG on the MiniLM testbed (docs/methods/bang.md): fine-tune the sentiment probe with label
# smoothing + MixUp, average it with the probe (WiSE-FT, alpha 0.5), and compare OOD accuracy.
#
# Build the inputs and run this example in one go: bash merges/run-example.sh bang
# Or create the inputs first (from the repository root; ~4-7 min on 2 CPU cores):
#   weightsmith testbed minilm merges/inputs/minilm
# Run: bash merges/bang.sh   (writes out/bang-*)
set -euo pipefail
cd "$(dirname "$0")/.."
IN=merges/inputs/minilm
DATA=$IN/data/sentiment
COMMON=(--task classification --steps 60 --lr 1e-4 --warmup-steps 6 --max-length 48
        --freeze word_embeddings --seed 0 --overwrite --quiet)

# 1. BANG: calibrated fine-tune (kept in out/bang-ft), then wise_ft alpha 0.5 with the probe.
weightsmith bang $IN/probe-sentiment out/bang --data $DATA/train.jsonl \
  --label-smoothing 0.1 --mixup 0.4 --alpha 0.5 --finetuned out/bang-ft "${COMMON[@]}"

# 2. Plain WiSE-FT for comparison: an ordinary fine-tune, then the same average.
weightsmith finetune $IN/probe-sentiment out/plain-ft --data $DATA/train.jsonl "${COMMON[@]}"
cat > out/wise-ft.yaml <<YAML
merge_method: wise_ft
base_model: $PWD/$IN/probe-sentiment
models: [$PWD/out/plain-ft]
parameters: {alpha: 0.5}
YAML
weightsmith merge out/wise-ft.yaml out/wise-ft --overwrite --quiet

# 3. The data-free variant: the plain fine-tune's head divided by 2 before averaging.
cat > out/bang-data-free.yaml <<YAML
merge_method: bang
base_model: $PWD/$IN/probe-sentiment
models: [$PWD/out/plain-ft]
parameters: {alpha: 0.5, temperature: 2.0}
YAML
weightsmith merge out/bang-data-free.yaml out/bang-data-free --overwrite --quiet

for model in out/wise-ft out/bang out/bang-data-free; do
  echo "$model OOD: $(weightsmith eval $model --data $DATA/test_ood.jsonl --task classification)"
done
