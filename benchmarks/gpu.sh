#!/usr/bin/env bash
# One-shot GPU benchmark of flaxresnet vs Keras 3 (JAX backend) on one GPU; about 8 minutes on an H100.
#
# Set-up, from a clone (no network needed afterwards: all data are synthetic uint8):
#   python3 -m venv .venv && .venv/bin/pip install -e '.[keras,cuda12]'   # or cuda13
# Run (from anywhere):
#   PYTHON=.venv/bin/python benchmarks/gpu.sh OUT_DIR
# Writes into OUT_DIR:
#   seed_256px_b64.json   the seed recipe step (32 px -> 256 px, frozen convs, trainable BN, seed head, random
#                         erasing) at batch 64, float32 and bfloat16, flaxresnet vs Keras, with eval throughput
#                         and the projected 15-epoch CIFAR-100 time (15 x 781 steps + 15 x 10k eval images)
#   seed_256px_b256.json  the same at batch 256 (15 x 195 steps)
#   full_224px_b64.json   full fine-tune (nothing frozen) on 224 px images, flaxresnet vs Keras
#   input_pipeline.json   host pipeline throughput (it must outrun the GPU step)
#   nvidia-smi.txt        the GPU it ran on
# GPU_BENCH_TINY=1 shrinks every size (64 px, batches 2 and 4, 32 px full fine-tune, 1 step) and lifts the time
# limits, to check the script end to end on a CPU (about 15 minutes on 2 cores).
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
python=${PYTHON:-python}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
  seed_px=64 full_px=32 small=2 large=4 steps=1 examples=2048 scale=0  # timeout 0: no limit
else
  seed_px=256 full_px=224 small=64 large=256 steps=20 examples=50000 scale=1
  "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || {
    echo "no GPU visible to JAX: pip install -e '.[cuda12]' or '.[cuda13]', or set GPU_BENCH_TINY=1 for a CPU check" >&2
    exit 1
  }
fi
(nvidia-smi 2>&1 || echo "nvidia-smi not available") > "$out/nvidia-smi.txt"

# Each run has its own time limit, so the whole script ends within 10 minutes whatever happens; a run that
# fails or runs out of time is reported and the others still run.
failed=0
run() {
  local limit=$1 name=$2
  shift 2
  echo "== $name"
  timeout "$((limit * scale))" "$python" -m "$@" --out "$out/$name.json" || {
    echo "!! $name failed or ran out of its ${limit} s (exit $?)" >&2
    failed=1
  }
}
run 240 seed_256px_b64 benchmarks.train_step --image-size "$seed_px" --batch-size "$small" --steps "$steps" \
  --project --variants flax:convs:float32 keras:convs:float32 flax:convs:bfloat16 keras:convs:bfloat16 \
  flax-eval:convs:float32 flax-eval:convs:bfloat16
run 160 seed_256px_b256 benchmarks.train_step --image-size "$seed_px" --batch-size "$large" --steps "$steps" \
  --project --variants flax:convs:float32 keras:convs:float32 flax:convs:bfloat16 flax-eval:convs:bfloat16
run 160 full_224px_b64 benchmarks.train_step --native-size "$full_px" --image-size "$full_px" \
  --batch-size "$small" --steps "$steps" --variants flax:none:float32 keras:none:float32 flax:none:bfloat16
run 20 input_pipeline benchmarks.input_pipeline --examples "$examples"
echo "results in $out"
exit "$failed"
