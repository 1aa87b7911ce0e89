# Shared by the run scripts: one function that launches main.py for one configuration.
#   NGPUS        processes/GPUs per run (each script sets its own default)
#   DATA_PATH    CIFAR-100 folder (cifar-100-python) or its parent   [./datasets/cifar-100-python]
#   OUTPUT_ROOT  parent of the run folders                           [./output]
#   DRY_RUN=1    print the commands instead of running them
# Arguments given to a script are appended to every run (e.g. --epochs 1 --device cpu).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA_PATH="${DATA_PATH:-./datasets/cifar-100-python}"
OUTPUT_ROOT="${OUTPUT_ROOT:-./output}"
PYTHON="${PYTHON:-python}"

TINY=vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
SMALL=vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
# The paper's runs: 4 GPUs x batch 128, fp32, no drop-path, weight decay 0.1, CIFAR-100 at 224 px.
PAPER_FLAGS=(--batch-size 128 --drop-path 0.0 --weight-decay 0.1 --no_amp --data-set CIFAR)

# famba_run OUTPUT_SUBDIR MODEL STRATEGY LAYER TOKEN [more main.py flags...]
famba_run() {
    local out="$1" model="$2" strategy="$3" layer="$4" token="$5"
    shift 5
    local cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" main.py
               --model "$model" "${PAPER_FLAGS[@]}" --data-path "$DATA_PATH" --output_dir "$OUTPUT_ROOT/$out"
               --fusion-strategy "$strategy" --fusion-layer "$layer" --fusion-token "$token" "$@")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "${cmd[*]}"
    else
        mkdir -p "$OUTPUT_ROOT/$out"
        echo "==> $OUTPUT_ROOT/$out"
        "${cmd[@]}"
    fi
}

# short model name for folder names
short_name() { case "$1" in "$TINY") echo vim_ti ;; "$SMALL") echo vim_s ;; *) echo "$1" ;; esac; }
