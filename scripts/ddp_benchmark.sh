#!/usr/bin/env bash
# DDP training-step benchmark on one host: benchmark.py through torchrun with one process, then with NGPUS
# processes (one GPU each, batch 128 per GPU), in the same call; then the scaling table (scripts/ddp_scaling.py).
#   NGPUS        processes/GPUs of the second run                 [2]
#   MODES        benchmark.py modes                               [ddp ddp-eager]: the captured and the eager step
#   OUTPUT_ROOT  where the JSON goes                              [./output/ddp_benchmark]
#   LAUNCHER     torchrun, or launch: torch.distributed.launch --use_env (README's form)  [torchrun]
# Arguments are passed to benchmark.py (default: Vim-Ti and Vim-S, none / all r7 / upper L4 r9, fp32).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS="${NGPUS:-2}"
OUTPUT_ROOT="${OUTPUT_ROOT:-./output/ddp_benchmark}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUTPUT_ROOT"
TINY=vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
SMALL=vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2
ARGS=(--models "$TINY" "$SMALL" --strategies none all:7 upper:4:9 --precisions fp32)
[[ $# -gt 0 ]] && ARGS=("$@")
case "${LAUNCHER:-torchrun}" in
    torchrun) LAUNCH=(-m torch.distributed.run --standalone) ;;
    launch) LAUNCH=(-m torch.distributed.launch --use_env --standalone) ;;  # standalone: a free port
    *) echo "ddp_benchmark.sh: error: LAUNCHER must be torchrun or launch, got '$LAUNCHER'" >&2; exit 2 ;;
esac
for n in 1 "$NGPUS"; do
    # shellcheck disable=SC2086
    "$PYTHON" "${LAUNCH[@]}" --nproc_per_node="$n" benchmark.py --modes ${MODES:-ddp ddp-eager} \
        "${ARGS[@]}" --output "$OUTPUT_ROOT/ddp_x$n.json"
done
"$PYTHON" scripts/ddp_scaling.py "$OUTPUT_ROOT/ddp_x1.json" "$OUTPUT_ROOT/ddp_x$NGPUS.json" \
    --output "$OUTPUT_ROOT/scaling_x$NGPUS.json"
