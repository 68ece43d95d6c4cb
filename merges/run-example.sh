#!/usr/bin/env bash
# README's first command: set up, build the example inputs (offline), run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
.venv/bin/python merges/build_inputs.py merges/inputs --quiet
.venv/bin/weightsmith plan merges/minilm-task-arithmetic.yaml | tail -n 9
.venv/bin/weightsmith merge merges/minilm-task-arithmetic.yaml out/minilm-task-arithmetic --overwrite
.venv/bin/weightsmith inspect out/minilm-task-arithmetic
