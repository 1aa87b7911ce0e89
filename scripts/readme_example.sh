#!/usr/bin/env bash
# The Famba-V README command: Vim-Ti, upper-layer fusion from the 6th layer, 8 tokens per layer
# (= Table 3's 8-token row), one GPU unless NGPUS says otherwise, batch 128 per GPU, fp32.
source "$(dirname "$0")/common.sh"
NGPUS="${NGPUS:-1}"
famba_run readme_example/vim_ti_upper_l4_r8 "$TINY" upper 4 8 --num_workers 25 "$@"
