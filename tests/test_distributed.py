"""Two CPU processes over gloo, started the two ways the README shows."""
import json
import os

import pytest

from pipeline_helpers import QUIET, TINY_MODEL, free_port, read_log, read_summary, run, write_cifar100

BATCH = 16


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_cifar100(root / 'cifar-100-python', n_train=64, n_test=25)  # 25: does not split evenly over 2
    return str(root / 'cifar-100-python')


def train_args(data, out, epochs):
    return TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', data, '--output_dir', out,
                                 '--batch-size', BATCH, '--epochs', epochs, '--fusion-strategy', 'interleaved',
                                 '--fusion-token', 3]


def test_launch_use_env_two_processes_with_distributed_eval(data, tmp_path):
    launcher = ['-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={free_port()}', '--use_env']
    proc = run(train_args(data, tmp_path, 2) + ['--dist-eval'], launcher=launcher)
    assert 'distributed init (rank 0, world 2, backend gloo)' in proc.stdout
    log, summary = read_log(tmp_path), read_summary(tmp_path)
    assert [e['epoch'] for e in log] == [0, 1]  # one line per epoch: only rank 0 writes
    # lr scaled by the global batch (2 x 16); cosine over 2 epochs from there
    assert log[0]['train_lr'] == pytest.approx(5e-4 * BATCH * 2 / 512, rel=1e-12)
    # RASampler: ceil(64 / 2) = 32 indices per process = 2 steps of 16 -> 64 images per epoch over both
    assert log[0]['train_images_per_s'] == pytest.approx(64 / log[0]['epoch_time_s'], rel=1e-9)
    assert log[-1]['test_images'] == 25  # the shards add up to the whole set, nothing padded or dropped
    assert summary['world_size'] == 2 and summary['fusion']['removed_per_layer'] == [0, 3, 0, 3]
    # the sharded evaluation equals a one-process evaluation of the saved model
    ev_dir = tmp_path / 'eval'
    run(train_args(data, ev_dir, 2) + ['--eval', '--resume', tmp_path / 'checkpoint.pth'])
    ev = json.load(open(ev_dir / 'eval.json'))
    assert ev['test_acc1'] == log[-1]['test_acc1'] and ev['test_acc5'] == log[-1]['test_acc5']
    assert ev['test_loss'] == pytest.approx(log[-1]['test_loss'], rel=1e-6)


def test_torchrun_two_processes(data, tmp_path):
    launcher = ['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}']
    run(train_args(data, tmp_path, 1) + ['--no-repeated-aug', '--no-model-ema'], launcher=launcher)
    (entry,) = read_log(tmp_path)
    assert entry['test_images'] == 25  # without --dist-eval every process evaluates the whole set
    assert entry['train_images_per_s'] == pytest.approx(64 / entry['epoch_time_s'], rel=1e-9)
    assert sorted(os.listdir(tmp_path)) == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'summary.json']
