#!/usr/bin/env bash
# README's first command: set up .venv, build an example's inputs (offline), run it.
#
#   bash merges/run-example.sh            the main example, minilm-task-arithmetic (~3.5 min once)
#   bash merges/run-example.sh NAME       another example: builds what it needs first
#   bash merges/run-example.sh --list     the examples and how long their inputs take
#
# Inputs are built once under merges/inputs/ and reused (testbeds are cached by recipe hash);
# merges/input-commands.txt says which command builds which input, and a merge whose input is
# missing names that command. Times: the first run, 2 quiet CPU cores; later runs reuse inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

list() {
  cat <<'EOF'
minilm-task-arithmetic   task vectors of the real MiniLM encoder     inputs: ~3.5 min (2 short fine-tunes)
minilm-tsv               TSV-M spectral merge of the same inputs     inputs: ~3.5 min (2 short fine-tunes)
lines                    LiNeS edit of a TinyLM skill                inputs: ~4-7 min (tinylm testbed)
transfer                 move a TinyLM skill to a newer base         inputs: ~4-7 min (tinylm testbed)
antidote                 repair a harmful TinyLM fine-tune           inputs: ~4-7 min + 20 s
graft                    apply a skill-grafting mask                 inputs: ~4-7 min + ~6 min mask search
soup-greedy              greedy soup of MiniLM sentiment fine-tunes  inputs: ~4-7 min (minilm testbed) + 1 min
bang                     BANG vs WiSE-FT on MiniLM (a script)        inputs: ~4-7 min (minilm testbed)
minilm-search            CMA-ES search of weights and lambda (MiniLM) inputs: ~4-7 min (minilm testbed) + ~1-5 min
EOF
}

NAME=${1:-minilm-task-arithmetic}
if [ "$NAME" = "--list" ] || [ "$NAME" = "-h" ] || [ "$NAME" = "--help" ]; then
  list
  exit 0
fi
if ! list | grep "^$NAME " >/dev/null; then  # not -q: an early exit would SIGPIPE list
  echo "run-example.sh: no example named '$NAME'; choose one of:" >&2
  list >&2
  exit 2
fi

bash .ci/setup
export PATH="$PWD/.venv/bin:$PATH"
IN=merges/inputs

tinylm() { weightsmith testbed tinylm $IN/tinylm; }   # cached after the first build
minilm() { weightsmith testbed minilm $IN/minilm; }

merge() {  # merge merges/$1.yaml into out/$1 and show what was written
  weightsmith merge "merges/$1.yaml" "out/$1" --overwrite
  weightsmith inspect "out/$1" | tail -n 5
}

case "$NAME" in
  minilm-task-arithmetic)
    python merges/build_inputs.py $IN --quiet
    weightsmith plan merges/minilm-task-arithmetic.yaml   # one line per parameter setting; -v: per tensor
    weightsmith merge merges/minilm-task-arithmetic.yaml out/minilm-task-arithmetic --overwrite
    weightsmith inspect out/minilm-task-arithmetic
    ;;
  minilm-tsv)
    python merges/build_inputs.py $IN --quiet
    merge minilm-tsv
    ;;
  lines | transfer)
    tinylm
    merge "$NAME"
    weightsmith eval "out/$NAME" --data $IN/tinylm/data/revsep/test.jsonl --task causal-lm
    ;;
  antidote)
    tinylm
    [ -f $IN/antidote/harmful-ft/model.safetensors ] || python merges/make_antidote_inputs.py $IN
    merge antidote
    echo "share of trigger prompts refused again (exact_match):"
    weightsmith eval out/antidote --data $IN/antidote/refusal.jsonl --task causal-lm
    ;;
  graft)
    tinylm
    if [ ! -f $IN/graft-revsep.mask.safetensors ]; then
      weightsmith graft $IN/tinylm/base $IN/tinylm/ft-revsep $IN/graft-revsep --overwrite \
        --data $IN/tinylm/data/revsep/train.jsonl --val $IN/tinylm/data/revsep/val.jsonl \
        --task causal-lm --sparsity 0.01 --steps 10 --lr auto --max-length 64 \
        --mask-out $IN/graft-revsep.mask.safetensors
    fi
    merge graft
    ;;
  soup-greedy)
    minilm
    for lr in 3e-5 1e-4 2e-3; do
      [ -f $IN/soup/lr$lr/model.safetensors ] && continue
      weightsmith finetune $IN/minilm/probe-sentiment $IN/soup/lr$lr \
        --data $IN/minilm/data/sentiment/train.jsonl --task classification \
        --steps 30 --lr $lr --warmup-steps 3 --max-length 48 \
        --freeze classifier --freeze word_embeddings --overwrite --quiet
    done
    merge soup-greedy
    ;;
  bang)
    minilm
    bash merges/bang.sh
    ;;
  minilm-search)
    minilm
    python merges/search_minilm.py --testbed $IN/minilm --workdir out/minilm-search
    ;;
esac
