"""A tiny Famba-V model learns real data: scikit-learn's handwritten digits as an image folder."""
import importlib.util
import os

from pipeline_helpers import QUIET, REPO, read_log, read_summary, run

spec = importlib.util.spec_from_file_location('prepare_digits', os.path.join(REPO, 'scripts', 'prepare_digits.py'))
prepare_digits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_digits)


def test_tiny_fused_vim_learns_digits(tmp_path):
    n_train, n_val = prepare_digits.write_digits(str(tmp_path / 'digits'), size=32)
    assert (n_train, n_val) == (1437, 360)
    out = tmp_path / 'out'
    # 4 layers, width 32, 16 px patches: 4 patches + class token; upper-layer fusion above layer 0
    # removes one token in each of layers 1-3 (5 -> 4 -> 3 -> 2 tokens). No RandAugment/mixup/erasing, and so no
    # repeated augmentation (the demo's settings).
    run(QUIET + ['--depth', 4, '--embed-dim', 32, '--patch-size', 16, '--input-size', 32,
                 '--data-set', 'FOLDER', '--data-path', tmp_path / 'digits', '--output_dir', out,
                 '--epochs', 10, '--batch-size', 32, '--lr', 4e-3, '--unscale-lr', '--aa', 'none', '--reprob', 0,
                 '--mixup', 0, '--cutmix', 0, '--smoothing', 0, '--no-repeated-aug', '--no-model-ema',
                 '--print-freq', 50,
                 '--fusion-strategy', 'upper', '--fusion-layer', 0, '--fusion-token', 1], threads=2, timeout=600)
    log, summary = read_log(out), read_summary(out)
    assert summary['fusion']['tokens_per_layer'] == [5, 4, 3, 2]
    # measured: 30% after the first epoch, 82.8% after ten (chance: 10%)
    assert log[-1]['test_acc1'] > 70.0
    assert log[-1]['test_loss'] < log[0]['test_loss'] - 1.0
