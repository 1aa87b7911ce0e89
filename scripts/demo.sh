#!/usr/bin/env bash
# A short Famba-V run from a fresh checkout: sets up .venv, then trains a small Vim twice, without
# token fusion and with upper-layer fusion, and prints the efficiency table (time, memory, accuracy).
# Data: CIFAR-100 if it is in $CIFAR_PATH or can be downloaded there; otherwise scikit-learn's
# handwritten digits (real 8x8 scans shipped inside scikit-learn), written out as an image folder.
#   VENV (.venv), CIFAR_PATH (./datasets/cifar-100-python), OUTPUT_ROOT (./output/demo), EPOCHS
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CIFAR_PATH="${CIFAR_PATH:-./datasets/cifar-100-python}"
OUTPUT_ROOT="${OUTPUT_ROOT:-./output/demo}"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet -r vim_requirements.txt
PY="$VENV/bin/python"
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
WORKERS=8
[[ "$DEVICE" == cpu ]] && WORKERS=0  # loader workers would compete with the model for the few cores

if "$PY" - "$CIFAR_PATH" <<'PYEOF'
import sys
import datasets
try:
    datasets.resolve_cifar_folder(sys.argv[1], 'CIFAR')
except datasets.DataSetError as e:
    sys.exit(str(e))
PYEOF
then
    echo "Training on CIFAR-100 from $CIFAR_PATH"
    DATA=(--data-set CIFAR --data-path "$CIFAR_PATH")
    EPOCHS="${EPOCHS:-1}"
else
    echo
    echo "CIFAR-100 is not available here, so this demo trains on scikit-learn's handwritten digits instead"
    echo "(1,797 real 8x8 scans of 10 digits, upscaled to 32x32; a much smaller and easier task than CIFAR-100)."
    "$PY" scripts/prepare_digits.py --out ./datasets/digits
    # no augmentation for 8x8 scans, so no repeated augmentation either (it would repeat identical images)
    DATA=(--data-set FOLDER --data-path ./datasets/digits --aa none --reprob 0 --mixup 0 --cutmix 0 --smoothing 0
          --no-repeated-aug)
    EPOCHS="${EPOCHS:-10}"
fi

# A 4-layer, 32-wide Vim on 32x32 images in 8x8 patches: 16 patches + class token = 17 tokens.
# Upper-layer fusion above layer 0 removes 4 tokens in each of layers 1-3: 17 -> 13 -> 9 -> 5.
for setting in "no 0 0" "upper 0 4"; do
    read -r strategy layer token <<< "$setting"
    "$PY" main.py --device "$DEVICE" --depth 4 --embed-dim 32 --patch-size 8 --input-size 32 "${DATA[@]}" \
        --epochs "$EPOCHS" --batch-size 32 --lr 4e-3 --unscale-lr --warmup-epochs 0 --drop-path 0 \
        --no-model-ema --num_workers "$WORKERS" --print-freq 20 \
        --fusion-strategy "$strategy" --fusion-layer "$layer" --fusion-token "$token" \
        --output_dir "$OUTPUT_ROOT/$strategy"
done
echo
echo "Per-epoch logs: $OUTPUT_ROOT/*/log.txt; summaries: $OUTPUT_ROOT/*/summary.json"
"$PY" scripts/collect_results.py --metric final "$OUTPUT_ROOT/no" "$OUTPUT_ROOT/upper"
