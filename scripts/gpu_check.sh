#!/usr/bin/env bash
# On a CUDA machine: install the mamba-ssm / causal-conv1d wheels from WHEEL_DIR (if given), run the kernel
# tests on the GPU and the CUDA-only tests (kernel paths vs pure-PyTorch path, CUDA-graph step), then the
# efficiency benchmark.
#   WHEEL_DIR=/path/to/wheels bash scripts/gpu_check.sh [benchmark.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${WHEEL_DIR:-}" ]; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEEL_DIR"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ssm_ops; print('torch', torch.__version__, '| kernels:', ssm_ops.KERNEL_BACKENDS)"
python3 -m pytest -q -s tests/test_kernels_scan.py tests/test_kernels_fusion.py tests/test_kernels_norm.py tests/test_kernels_launch.py \
  tests/test_ssm_ops.py tests/test_cuda.py
python3 benchmark.py "$@"
