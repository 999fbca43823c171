#!/usr/bin/env bash
# The accelerator figures of issues 10 and 11 in one run, JAX only (the device image has jax, flax,
# optax and numpy; nothing from PyTorch is needed). From the repository root on the device machine:
#
#   bash benchmarks/device.sh     # writes device.md here, or $OUT/device.md where OUT is set
#   (PYTHON, MODEL, N override the interpreter, the preset and the timed calls per case)
#
# 1. MaskInversion on ViT-B/16 (random weights, 10 steps, official defaults), decomposed and exact,
#    1/10/50/100 masks at 224 px and 10 at 448 px: the target is 100 masks x 10 steps <= 0.05 s.
# 2. Maps per second at batch 64 for LeGrad, GradCAM, rollout, Chefer and saliency.
# 3. Issue 19: 1,000 masks on one 224 px and one 448 px image (benchmarks/maskinversion_scale.py, the
#    accelerator's devices, BUDGET_GB of the planned peak: 60 fits an 80 GB card), a second timed call.
# Not yet run on an accelerator (no task has been lent one); checked on the CPU with MODEL=small N=1.
# Record the table with the device, date and jax version in benchmarks/RESULTS.md.
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}/device.md"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } >> "$out"
"${PYTHON:-python3}" benchmarks/attribution.py --cases maskinversion_jax throughput --model "${MODEL:-ViT-B-16}" \
  --n "${N:-5}" --out "$out"
echo '## MaskInversion at dataset scale (issue 19)' >> "$out"
JAX_PLATFORMS="${JAX_PLATFORMS:-}" "${PYTHON:-python3}" benchmarks/maskinversion_scale.py --preset "${MODEL:-ViT-B-16}" \
  --size 224 448 --masks 1000 --devices 1 --budget-gb "${BUDGET_GB:-60}" --mode decomposed --steps 10 --repeat 1 \
  --sensitivity 0 | tee -a "$out"
