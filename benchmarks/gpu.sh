#!/usr/bin/env bash
# One-shot GPU benchmark on one GPU: flaxresnet vs Keras 3 (JAX backend) vs PyTorch (torchvision ResNet50), the
# seed recipe at 256 px; ends within 10 minutes (GPU_BENCH_BUDGET seconds of runs, default 540).
#
# Runs from a plain copy of the repository, with no network and no install of the project (PYTHONPATH is set to
# the copy). Needs jax with GPU support, flax, optax, orbax-checkpoint, h5py, tqdm, pillow and matplotlib;
# torch and torchvision for the PyTorch rows (without them those are skipped); keras for the Keras rows. Where
# keras is not installed, download its wheels beforehand, on a machine with network access:
#   benchmarks/gpu_wheels.sh    # keras and the dependencies a bare GPU image lacks -> benchmarks/wheels/
# and this script installs them from there, offline, into $GPU_BENCH_SITE (default /tmp/flaxresnet-gpu-site),
# which it puts on PYTHONPATH; without them the Keras rows are skipped. Run (from anywhere):
#   PYTHON=python3 bash benchmarks/gpu.sh OUT_DIR
# Writes into OUT_DIR (7 files):
#   seed_256px_b64.json   the seed recipe step (32 px -> 256 px, frozen convs, trainable BN, seed head, random
#                         erasing) at batch 64, float32 and bfloat16, flaxresnet vs Keras, with eval throughput
#                         and the projected 15-epoch CIFAR-100 time (15 x 781 steps + 15 x 10k eval images)
#   torch_256px_b64.json  the same step in PyTorch (benchmarks/torch_step.py): eager float32 and bfloat16,
#                         torch.compile bfloat16, eager eval, projection
#   seed_256px_b256.json  flaxresnet and Keras at batch 256 (15 x 195 steps)
#   torch_256px_b256.json PyTorch at batch 256
#   input_pipeline.json   host pipeline throughput (it must outrun the GPU step)
#   full_224px_b64.json   full fine-tune (nothing frozen) on 224 px images, flaxresnet vs Keras
#   gpu_summary.png       every img/s figure as bars (benchmarks/gpu_summary.py, which also prints the
#                         README's GPU table last)
# The GPU it ran on (nvidia-smi) is printed first. Runs go in that order, most wanted first; each has its own
# time limit, cut to what is left of the budget, so the script ends in time whatever happens; a run that fails
# or runs out of time is reported, the others still run, and the exit status is then 1.
# GPU_BENCH_TINY=1 shrinks every size (64 px, batches 2 and 4, 32 px full fine-tune, 1 step) and lifts the time
# limits, to check the script end to end on a CPU (12.4 minutes on 2 busy cores, Python 3.11).
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KERAS_BACKEND=jax

if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
  seed_px=64 full_px=32 small=2 large=4 steps=1 warmup=1 examples=2048 tiny=1
else
  seed_px=256 full_px=224 small=64 large=256 steps=20 warmup=2 examples=50000 tiny=0
  "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || {
    echo "no GPU visible to JAX: install jax with GPU support, e.g. pip install -e '.[cuda12]' or" \
      "'.[cuda13]' (or set GPU_BENCH_TINY=1 for a CPU check)" >&2
    exit 1
  }
fi
nvidia-smi 2>&1 || echo "nvidia-smi not available"

failed=0
importable() { "$python" -c "import $1" 2>/dev/null; }
if ! importable keras && compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  site=${GPU_BENCH_SITE:-/tmp/flaxresnet-gpu-site}
  echo "== installing benchmarks/gpu_wheels.txt from benchmarks/wheels into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --find-links benchmarks/wheels --target "$site" -r benchmarks/gpu_wheels.txt || true
  export PYTHONPATH="$PYTHONPATH:$site"
fi
keras=1 torch=1
importable keras || {
  keras=0 failed=1
  echo "!! keras is not importable: the Keras rows are skipped (run benchmarks/gpu_wheels.sh where there is" \
    "network and bring benchmarks/wheels along)" >&2
}
importable "torch, torchvision" || {
  torch=0 failed=1
  echo "!! torch or torchvision is not importable: the PyTorch rows are skipped" >&2
}

# The variants this machine can run: Keras' only with keras.
variants() {
  for v; do
    if [ "$keras" = 1 ] || [ "${v%%:*}" != keras ]; then echo "$v"; fi
  done
}

budget=${GPU_BENCH_BUDGET:-540}
run() {  # LIMIT_S NAME MODULE ARGS...: one benchmark process, writing OUT_DIR/NAME.json
  local limit=$1 name=$2 left=$((budget - SECONDS))
  shift 2
  echo "== $name"
  if [ "$tiny" = 1 ]; then
    limit=0  # timeout 0: no limit
  elif [ "$left" -lt "$limit" ]; then
    limit=$left
    if [ "$limit" -lt 30 ]; then
      echo "!! $name skipped: ${left} s of the ${budget} s budget left" >&2
      failed=1
      return
    fi
  fi
  timeout -k 10 "$limit" "$python" -m "$@" --out "$out/$name.json" || {
    echo "!! $name failed or ran out of its ${limit} s (exit $?)" >&2
    failed=1
  }
}
seed=(--image-size "$seed_px" --steps "$steps" --warmup "$warmup" --project)
# shellcheck disable=SC2046  # variants prints one word a line
run 200 seed_256px_b64 benchmarks.train_step "${seed[@]}" --batch-size "$small" --variants $(variants \
  flax:convs:float32 keras:convs:float32 flax:convs:bfloat16 keras:convs:bfloat16 flax-eval:convs:float32 \
  flax-eval:convs:bfloat16)
if [ "$torch" = 1 ]; then
  run 120 torch_256px_b64 benchmarks.torch_step "${seed[@]}" --batch-size "$small" --variants \
    torch:eager:float32 torch:eager:bfloat16 torch:compile:bfloat16 torch-eval:eager:bfloat16
fi
# shellcheck disable=SC2046
run 130 seed_256px_b256 benchmarks.train_step "${seed[@]}" --batch-size "$large" --variants $(variants \
  flax:convs:float32 keras:convs:float32 flax:convs:bfloat16 flax-eval:convs:bfloat16)
if [ "$torch" = 1 ]; then
  run 90 torch_256px_b256 benchmarks.torch_step "${seed[@]}" --batch-size "$large" --variants \
    torch:eager:bfloat16 torch:compile:bfloat16 torch-eval:eager:bfloat16
fi
run 20 input_pipeline benchmarks.input_pipeline --examples "$examples"
# shellcheck disable=SC2046
run 120 full_224px_b64 benchmarks.train_step --native-size "$full_px" --image-size "$full_px" \
  --batch-size "$small" --steps "$steps" --warmup "$warmup" --variants $(variants flax:none:float32 \
  keras:none:float32 flax:none:bfloat16)
timeout 60 "$python" -m benchmarks.gpu_summary "$out" || failed=1
echo "results in $out (${SECONDS} s)"
exit "$failed"
