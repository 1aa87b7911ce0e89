#!/usr/bin/env bash
# Training-step benchmark on one GPU (the README's efficiency table): Vim-Ti and Vim-S, 224 px, batch 128,
# 100 classes, the paper's strategies, fp32 and bf16, the captured step (main.py's default on CUDA), the same
# with its all-reduce (ddp, world size 1) and eager, with the Triton kernels and (if installed) mamba-ssm's; then
# TF32 matmuls (main.py --tf32) as extra rows; then the mixer's kernels alone against sequence length. Results as
# JSON under OUTPUT_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_ROOT="${OUTPUT_ROOT:-./output/benchmark}"
mkdir -p "$OUTPUT_ROOT"
TINY=vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
SMALL=vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
BACKENDS=(triton)  # and mamba-ssm's kernels as the same-call stand-in for the authors', where installed
python3 -c "import ssm_ops, sys; sys.exit(not ssm_ops.KERNEL_BACKENDS['cuda'][0])" && BACKENDS+=(cuda)
python3 benchmark.py --models "$TINY" "$SMALL" --ssm-backends "${BACKENDS[@]}" --precisions fp32 bf16 \
    --modes graph ddp eager --strategies none all:7 interleaved:14 lower:19:9 upper:4:9 upper:4:8 --output "$OUTPUT_ROOT/main.json" "$@"
python3 benchmark.py --models "$TINY" "$SMALL" --precisions fp32 --modes graph --variants tf32 \
    --strategies none upper:4:9 --output "$OUTPUT_ROOT/tf32.json" "$@"
python3 scripts/scan_benchmark.py --lengths 197 129 33 --conv --output "$OUTPUT_ROOT/kernels.json"
