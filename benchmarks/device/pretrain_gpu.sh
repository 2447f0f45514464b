#!/usr/bin/env bash
# One device call (repo root, carry [".whl"], timeout_s 600): the embedded family trained on the GPU.
# See benchmarks/device/pretrain_gpu.py for what it does and how to read what comes back in $OUT.
set -euo pipefail
ls .whl/*.whl > /dev/null ||
    { echo "no wheels in .whl/: run benchmarks/device/fetch_wheels.sh here first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers as t; print(torch.__version__, diffusers.__version__, t.__version__)"
# A UNet wider than the CPU recipe's: width, more than steps, is what lets it draw the classes (RESULTS.md,
# "Width, not steps"); [64, 128, 128] is the widest that fits issue 3's 40 MB, stored in float16.
python3 benchmarks/device/pretrain_gpu.py --out "$OUT" --deadline-s "${DEADLINE_S:-520}" \
    --set "generator.unet_channels=${UNET_CHANNELS:-[64, 128, 128]}" \
    --set generator.unet_storage_dtype=float16 2>&1 | tee "$OUT/log.txt"
# The new family beside the shipped one (same oracle as judge), so the figures are in the call's output.
python3 benchmarks/pretrain_reproduce.py genaug/embedded /tmp/genaug-gpu/family | tee "$OUT/compare.md" || true
