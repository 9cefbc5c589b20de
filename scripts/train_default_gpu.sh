#!/usr/bin/env bash
# Train the default model on a lent GPU (device tool): `bash scripts/train_default_gpu.sh` with $OUT set.
# The same recipe runs on a CPU with: python -m diffseg.export.train --config export/configs/default.json -o runs/default
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/source-env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)"
OUT=$(realpath "${OUT:-runs}")
root=$PWD
cd /tmp
python -m diffseg.export.train --config "$root/export/configs/default.json" -o "$OUT/default_run" --device cuda \
  --workers 16 --time-limit-min "${TRAIN_MINUTES:-6.5}" 2>&1 | tee "$OUT/train_stdout.log"
rm -f "$OUT/default_run/last.pt.tmp"
