#!/usr/bin/env bash
# Paper Table 3: Vim-Ti, upper-layer fusion from the 6th layer (--fusion-layer 4), 1..9 tokens per layer.
# Results in $OUTPUT_ROOT/table3/vim_ti_upper_l4_r<tokens>/
source "$(dirname "$0")/common.sh"
NGPUS="${NGPUS:-4}"
for token in 1 2 3 4 5 6 7 8 9; do
    famba_run "table3/vim_ti_upper_l4_r${token}" "$TINY" upper 4 "$token" "$@"
done
