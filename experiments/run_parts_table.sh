#!/usr/bin/env bash
# The prior x guide x objective table of docs/parts.md: every cell is the same short
# training on binarized MNIST (160 Adam steps), about 15-25 minutes on 2 CPU cores.
#   DATA_DIR=path/to/data experiments/run_parts_table.sh   (default: $PYRO_VAE_DATA)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-${PYRO_VAE_DATA:?set DATA_DIR or PYRO_VAE_DATA to the folder holding binarized-mnist/ and mnist/}}
PYTHON=${PYTHON:-python}
# timing first (seconds, no training beyond a few steps per cell), then the table
PYTHONPATH=. "$PYTHON" experiments/parts_table.py --data-dir "$DATA_DIR" --estimate
PYTHONPATH=. "$PYTHON" experiments/parts_table.py --data-dir "$DATA_DIR" \
    --train-size 8000 --valid-size 2000 --epochs 2 --batch-size 100 --lr 1e-3 --seed 0 \
    --out experiments/parts_table.md
