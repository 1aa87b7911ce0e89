#!/usr/bin/env bash
# Real-data learning check on one GPU: Vim-Ti trained through main.py on CIFAR-10, without fusion and with
# upper-layer fusion (layer 4, 8 tokens), 3 epochs of the DeiT recipe at batch 128 and 224 px; then prints each
# run's per-epoch log lines (accuracy, epoch time, peak memory).
#   DATA_SET     CIFAR10 (the python version, downloaded if missing) or FOLDER (an image folder: train/, val/)
#   DATA_PATH    its folder                                   [./datasets/cifar-10-batches-py]
#   NUM_WORKERS  data-loader workers per run                  [14]
#   OUTPUT_ROOT  parent of the two run folders                [./output/learning_check]
#   PYTHON       the interpreter                              [python]
# Arguments are appended to both runs (e.g. --amp-dtype bfloat16 --sched-on-updates --unscale-lr).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_SET="${DATA_SET:-CIFAR10}"
DATA_PATH="${DATA_PATH:-./datasets/cifar-10-batches-py}"
OUTPUT_ROOT="${OUTPUT_ROOT:-./output/learning_check}"
for run in "none --fusion-strategy no" "upper_L4_r8 --fusion-strategy upper --fusion-layer 4 --fusion-token 8"; do
    name=${run%% *}
    "${PYTHON:-python}" main.py \
        --model vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \
        --data-set "$DATA_SET" --data-path "$DATA_PATH" --batch-size 128 --epochs 3 --warmup-epochs 1 \
        --num_workers "${NUM_WORKERS:-14}" --output_dir "$OUTPUT_ROOT/$name" ${run#* } "$@"
done
for name in none upper_L4_r8; do
    echo "== $name"
    cat "$OUTPUT_ROOT/$name/log.txt"
done
