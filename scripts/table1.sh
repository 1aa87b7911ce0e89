#!/usr/bin/env bash
# Paper Table 1: Vim-Ti and Vim-S, no fusion vs the four strategies (0-indexed layers, see README):
#   all r7 | interleaved r14 | lower: layers < 19, r9 | upper: layers > 4, r9
# Results in $OUTPUT_ROOT/table1/<model>_<strategy>/; then: python scripts/collect_results.py $OUTPUT_ROOT/table1/*
source "$(dirname "$0")/common.sh"
NGPUS="${NGPUS:-4}"
for model in "$TINY" "$SMALL"; do
    for setting in "no 0 0" "all 0 7" "interleaved 0 14" "lower 19 9" "upper 4 9"; do
        read -r strategy layer token <<< "$setting"
        famba_run "table1/$(short_name "$model")_${strategy}" "$model" "$strategy" "$layer" "$token" "$@"
    done
done
