#!/usr/bin/env bash
# Paper Table 2: Vim-Ti, upper-layer fusion, (tokens per layer, starting layer k counted from 1).
# Fusion starts at layer k (1-indexed) = 0-indexed layer k-1, i.e. layers > k-2: --fusion-layer k-2.
# Results in $OUTPUT_ROOT/table2/vim_ti_upper_k<k>_r<tokens>/
source "$(dirname "$0")/common.sh"
NGPUS="${NGPUS:-4}"
for pair in 15:15 14:14 13:13 12:12 12:11 11:10 10:9 10:8 9:7 9:6 8:5 8:4 7:3 7:2; do
    token="${pair%%:*}" k="${pair##*:}"
    famba_run "table2/vim_ti_upper_k${k}_r${token}" "$TINY" upper $((k - 2)) "$token" "$@"
done
