#!/usr/bin/env bash
# Prepare, on a machine with network access, what the GPU machine cannot fetch for the reproduction:
#   .devcarry/repro/data/  the task data (bigbench_tasks.py needs the bigbench package, absent there)
#   .devcarry/repro/whl/   wheels for BLEU / ROUGE-L (sacrebleu, rouge-score and their imports) for Python 3.12
# Carry .devcarry/repro (a few MB) with the device tool; see experiments/reproduce/README.md.
# Usage: bash experiments/reproduce/device_prep.sh [bigbench_tasks.py options, e.g. --tasks ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=.devcarry/repro
mkdir -p "$OUT"
$PY -c "import bigbench" 2>/dev/null || $PY -m pip install -q --no-deps bigbench==1.0.0
$PY experiments/reproduce/bigbench_tasks.py --out "$OUT/data" --overwrite "$@"
rm -rf "$OUT/whl" && mkdir -p "$OUT/whl"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/whl" sacrebleu portalocker tabulate colorama lxml nltk absl-py six click joblib defusedxml
$PY -m pip wheel -q --no-deps -w "$OUT/whl" rouge-score
du -sh "$OUT/data" "$OUT/whl"
