"""Two CPU processes over gloo, started the two ways the README shows."""
import json
import os
import subprocess
import sys

import pytest
import torch

import datasets
import engine
import main
from pipeline_helpers import QUIET, REPO, TINY_MODEL, read_log, read_summary, run, write_cifar100
from samplers import DistributedEvalSampler

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
    launcher = ['-m', 'torch.distributed.launch', '--nproc_per_node=2', '--standalone', '--use_env']  # a free port
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
    # both processes end with the same parameters: the saved model's, summed on the side
    saved = torch.load(tmp_path / 'checkpoint.pth', map_location='cpu', weights_only=False)['model']
    flat = torch.cat([v.flatten() for v in saved.values()]).double()
    assert summary['param_checksums'][0] == summary['param_checksums'][1]
    assert summary['param_checksums'][0] == pytest.approx([flat.sum().item(), flat.square().sum().item()], rel=1e-12)
    # the logged numbers are the sums over both shards of an evaluation of the saved model
    shards = [evaluate_shard(data, tmp_path / 'checkpoint.pth', rank, 2) for rank in (0, 1)]
    assert [s['images'] for s in shards] == [13, 12]
    top1, top5 = (sum(round(s[k] * s['images'] / 100) for s in shards) for k in ('acc1', 'acc5'))
    assert log[-1]['test_acc1'] == 100.0 * top1 / 25 and log[-1]['test_acc5'] == 100.0 * top5 / 25
    assert log[-1]['test_loss'] == pytest.approx(sum(s['loss'] * s['images'] for s in shards) / 25, rel=1e-12)


def evaluate_shard(data, checkpoint, rank, world):
    """engine.evaluate of the saved model on the shard that process ``rank`` of a --dist-eval run holds, in the
    same batches (main.py's 1.5 x --batch-size) and with one thread as there: the same computation, so the same
    logits bit for bit. A one-process evaluation of the whole set batches the images differently, and a matmul's
    rounding may change with the batch; enough, on some CPU, to swap a close top-1/top-5 pair or a matching in a
    fused layer, so its accuracy need not equal the sharded one."""
    args = main.get_args_parser().parse_args([str(a) for a in train_args(data, '', 2)])
    dataset, classes = datasets.build_dataset(False, args)
    model = main.build_model(args, classes)
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=False)['model'])
    loader = torch.utils.data.DataLoader(dataset, sampler=DistributedEvalSampler(dataset, world, rank),
                                         batch_size=int(1.5 * BATCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as pipeline_helpers.run starts the processes
    try:
        return engine.evaluate(loader, model, torch.device('cpu'))
    finally:
        torch.set_num_threads(threads)


def test_torchrun_two_processes(data, tmp_path):
    launcher = ['-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone']
    run(train_args(data, tmp_path, 1) + ['--no-repeated-aug', '--no-model-ema'], launcher=launcher)
    (entry,) = read_log(tmp_path)
    assert entry['test_images'] == 25  # without --dist-eval every process evaluates the whole set
    assert entry['train_images_per_s'] == pytest.approx(64 / entry['epoch_time_s'], rel=1e-9)
    assert sorted(os.listdir(tmp_path)) == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'summary.json']


def test_ddp_check_script_resumes_a_killed_two_process_run_to_the_same_parameters(data, tmp_path):
    """scripts/ddp_check.py on two gloo processes: the run, the run killed after its first checkpoint and launched
    again, and a one-process evaluation. The script's verdicts are checked against the files themselves."""
    flags = [str(a) for a in TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', data, '--batch-size', BATCH,
                                                   '--epochs', 2, '--fusion-strategy', 'interleaved',
                                                   '--fusion-token', 3]]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # a one-process evaluation batches the 25 images differently from the shards: it may round a close top-1 apart
    proc = subprocess.run([sys.executable, 'scripts/ddp_check.py', '--nproc', '2', '--output-root', str(tmp_path),
                           '--eval-tolerance', '2', '--'] + flags, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'ddp_check.json').read_text())
    assert report['ok'] and all(c['ok'] for c in report['checks'].values())
    run_dir, resumed_dir = tmp_path / 'run', tmp_path / 'resumed'
    # the killed launch got as far as its first checkpoint, and the second launch resumed from it, flags unchanged
    assert [(r['epoch'], r['changed']) for r in read_summary(resumed_dir)['resumes']] == [(1, {})]
    saved = [torch.load(d / 'checkpoint.pth', map_location='cpu', weights_only=False)['model']
             for d in (run_dir, resumed_dir)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert [e['train_loss'] for e in read_log(run_dir)] == [e['train_loss'] for e in read_log(resumed_dir)]
    assert read_summary(run_dir)['param_checksums'][1] == read_summary(run_dir)['param_checksums'][0]
    single = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
    counts = report['checks']['dist_eval_equals_one_process']['correct_dist_eval_vs_one_process']
    assert counts['test_acc1'][1] == round(single['test_acc1'] * 25 / 100) and single['test_images'] == 25
    # the --dist-eval counts are those of the two shards evaluated here (the same computation: exactly)
    shards = [evaluate_shard(data, run_dir / 'checkpoint.pth', rank, 2) for rank in (0, 1)]
    for key, name in (('test_acc1', 'acc1'), ('test_acc5', 'acc5')):
        assert counts[key][0] == sum(round(s[name] * s['images'] / 100) for s in shards), key


def test_ddp_check_parameter_difference_of_two_checkpoints(tmp_path):
    """||a - b|| / ||a|| over all floating-point tensors, and per tensor for the worst one; integer buffers are not
    compared."""
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    import ddp_check
    a = {'w': torch.tensor([3.0, 4.0]), 'bias': torch.tensor([0.0, 1e-3]), 'steps': torch.tensor(7)}
    b = {'w': torch.tensor([3.0, 4.0]), 'bias': torch.tensor([0.0, -1e-3]), 'steps': torch.tensor(9)}
    for name, model in (('a.pth', a), ('b.pth', b)):
        torch.save({'model': model}, tmp_path / name)
    got = ddp_check.parameter_difference(tmp_path / 'a.pth', tmp_path / 'b.pth')
    bias = torch.tensor(1e-3).item()  # the float32 value saved
    assert got['relative'] == pytest.approx(2 * bias / (25 + bias ** 2) ** 0.5, rel=1e-12)
    assert (got['worst_tensor'], got['worst_tensor_relative'], got['bitwise_equal']) == ('bias', 2.0, False)
    torch.save({'model': {**a, 'steps': torch.tensor(8)}}, tmp_path / 'c.pth')
    assert ddp_check.parameter_difference(tmp_path / 'a.pth', tmp_path / 'c.pth') == {
        'relative': 0.0, 'worst_tensor': 'w', 'worst_tensor_relative': 0.0, 'bitwise_equal': True}
