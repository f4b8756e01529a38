#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt (keras and the keras 3 dependencies a bare GPU image lacks)
# into benchmarks/wheels/ (gitignored, about 3 MB), for benchmarks/gpu.sh to install on a GPU machine without
# network access. Needs network. The wheels are for CPython $GPU_WHEELS_PYTHON (default 3.12, the lent GPU
# machine's) on x86-64 Linux; keras and namex are pure Python, optree is built per Python version.
#   benchmarks/gpu_wheels.sh                          # for the GPU machine
#   GPU_WHEELS_PYTHON=3.11 benchmarks/gpu_wheels.sh   # for a CPython 3.11 rehearsal (GPU_BENCH_TINY=1)
set -euo pipefail
cd "$(dirname "$0")"
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --implementation cp \
  --python-version "${GPU_WHEELS_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels -r gpu_wheels.txt
ls -l wheels
