"""End-to-end runs of main.py on the CPU: a tiny Vim with Famba-V fusion on a CIFAR-100-format folder."""
import json
import os
import re

import pytest
import timm
import torch

import models_mamba  # noqa: F401
from pipeline_helpers import QUIET, TINY_MODEL, read_log, read_summary, run, write_cifar100

BATCH = 16
# upper-layer fusion above layer 1 of 4, 2 tokens per fused layer; step schedule (halve each epoch) so
# that a 2-epoch run and a 3-epoch run share the same learning rates
TRAIN = TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--batch-size', BATCH, '--fusion-strategy', 'upper',
                              '--fusion-layer', 1, '--fusion-token', 2, '--sched', 'step', '--decay-epochs', 1,
                              '--decay-rate', 0.5]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_cifar100(root / 'cifar-100-python', n_train=64, n_test=24)
    return str(root)  # the parent of cifar-100-python


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('straight'))
    proc = run(TRAIN + ['--data-path', data, '--output_dir', out, '--epochs', 3])
    return out, proc


def test_log_lines_hold_the_efficiency_and_accuracy_fields(straight):
    out, proc = straight
    log = read_log(out)
    assert [e['epoch'] for e in log] == [0, 1, 2]
    base_lr = 5e-4 * BATCH / 512  # DeiT's linear scaling, one process
    for e in log:
        assert e['train_lr'] == pytest.approx(base_lr * 0.5 ** e['epoch'], rel=1e-12)
        assert 0 < e['train_loss'] < 10 and 0 <= e['test_acc1'] <= e['test_acc5'] <= 100
        assert e['test_images'] == 24 and e['test_ema_images'] == 24
        # 64 images, batch 16, drop_last: 4 steps of 16 images per epoch
        assert e['train_images_per_s'] == pytest.approx(64 / e['epoch_time_s'], rel=1e-9)
        # the CPU's figure: the process's peak resident memory (ru_maxrss), which includes torch itself
        assert 100 < e['train_peak_mem_mib'] < 24 * 2 ** 10
    model = timm.create_model('vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2',
                              num_classes=100, img_size=32, depth=4, embed_dim=32, patch_size=8)
    assert {e['n_parameters'] for e in log} == {sum(p.numel() for p in model.parameters())}
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith('Epoch: [1]')]
    assert [re.search(r'\[ ?(\d)/4\]', ln).group(1) for ln in progress] == ['2', '4']


def test_summary_reports_fusion_time_and_accuracy(straight):
    out, _ = straight
    log, s = read_log(out), read_summary(out)
    f = s['fusion']
    assert f['removed_per_layer'] == [0, 0, 2, 2]  # layers 2 and 3 (> 1) each remove 2 of 17 tokens
    assert f['tokens_per_layer'] == [17, 17, 15, 13]
    assert f['token_layer_fraction'] == pytest.approx((17 + 17 + 15 + 13) / (4 * 17))
    best = max(log, key=lambda e: e['test_acc1'])  # the first of equals
    assert (s['best_acc1'], s['best_acc5'], s['best_epoch']) == (best['test_acc1'], best['test_acc5'], best['epoch'])
    assert s['max_acc5'] == max(e['test_acc5'] for e in log)
    assert s['final_acc1'] == log[-1]['test_acc1'] and s['final_acc5'] == log[-1]['test_acc5']
    assert s['total_time_s'] >= sum(e['epoch_time_s'] for e in log)
    h, m, sec = map(int, re.fullmatch(r'(\d+):(\d\d):(\d\d)', s['total_time']).groups())
    assert h * 3600 + m * 60 + sec == round(s['total_time_s'])
    assert s['max_peak_mem_mib'] == max(e['train_peak_mem_mib'] for e in log)
    assert s['precision'] == 'float32' and s['world_size'] == 1
    assert s['n_parameters'] == log[0]['n_parameters']
    assert s['args']['fusion_strategy'] == 'upper' and s['args']['fusion_token'] == 2
    files = sorted(os.listdir(out))
    assert files == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'summary.json']  # no temp files left
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    assert ckpt['epoch'] == 2 and ckpt['max_acc1'] == s['best_acc1']
    best = torch.load(os.path.join(out, 'best_checkpoint.pth'), map_location='cpu', weights_only=False)
    assert log[best['epoch']]['test_acc1'] == s['best_acc1']


def test_eval_reproduces_the_saved_models_accuracy(straight, data, tmp_path):
    out, _ = straight
    run(TRAIN + ['--data-path', data, '--output_dir', tmp_path, '--eval', '--resume',
                 os.path.join(out, 'checkpoint.pth')])
    ev = json.load(open(tmp_path / 'eval.json'))
    last = read_log(out)[-1]
    assert ev['test_acc1'] == last['test_acc1'] and ev['test_acc5'] == last['test_acc5']
    assert ev['test_loss'] == pytest.approx(last['test_loss'], rel=1e-9)
    assert ev['test_ema_loss'] == pytest.approx(last['test_ema_loss'], rel=1e-9)


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_continues_exactly_like_an_uninterrupted_run(workers, straight, data, tmp_path):
    # with loader workers they persist, reseed per epoch and start the next epoch during the evaluation: the
    # resumed run's fresh workers must draw the augmentations of the uninterrupted run's
    out = straight[0] if workers == 0 else str(tmp_path / 'straight')
    workers_flag = ['--num_workers', workers]
    if workers:
        run(TRAIN + workers_flag + ['--data-path', data, '--output_dir', out, '--epochs', 3])
    tmp_path = tmp_path / 'resumed'
    args = TRAIN + workers_flag + ['--data-path', data, '--output_dir', tmp_path]
    run(args + ['--epochs', 2])
    run(args + ['--epochs', 3, '--resume', tmp_path / 'checkpoint.pth'])
    log, ref = read_log(tmp_path), read_log(out)
    assert [e['epoch'] for e in log] == [0, 1, 2]
    for key in ('train_loss', 'train_lr', 'test_loss', 'test_acc1', 'test_ema_loss'):
        assert log[2][key] == ref[2][key], key
    a = torch.load(tmp_path / 'checkpoint.pth', map_location='cpu', weights_only=False)
    b = torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    for part in ('model', 'model_ema'):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert read_summary(tmp_path)['total_time_s'] >= a['elapsed_s'] > 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    # epoch 0 warms up at lr 1e-6; epoch 1 jumps to lr 1e30, which blows the weights up to inf/NaN
    args = TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', data, '--output_dir', tmp_path,
                                 '--batch-size', BATCH, '--epochs', 2, '--warmup-epochs', 1, '--lr', 1e30,
                                 '--unscale-lr', '--no-model-ema']
    proc = run(args, check=False)
    assert proc.returncode == 1
    assert 'Loss is not finite' in proc.stderr and 'epoch 1' in proc.stderr and 'Traceback' not in proc.stderr
    assert 'Lower --lr' in proc.stderr and '--no_amp' not in proc.stderr  # float16 AMP is off on the CPU: fp32
    ckpt = torch.load(tmp_path / 'checkpoint.pth', map_location='cpu', weights_only=False)
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert len(read_log(tmp_path)) == 1 and not (tmp_path / 'summary.json').exists()
    # as the message advises: resume with a lower --lr, which the resumed epoch then uses (the checkpoint's
    # optimizer and scheduler hold 1e30): cosine over 2 epochs, 1 of warmup, at epoch 1: (1e-3 + 1e-5) / 2
    import main
    s = main.main(main.get_args_parser().parse_args(
        [str(a) for a in args + ['--lr', 1e-3, '--resume', tmp_path / 'checkpoint.pth']]))
    log = read_log(tmp_path)
    assert log[1]['train_lr'] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12) and log[1]['train_loss'] < 10
    assert s['final_epoch'] == 1 and s['args']['lr'] == 1e-3 and s['resumes'][0]['changed'] == {'lr': [1e30, 1e-3]}


def test_missing_data_path_is_reported_with_the_path(tmp_path):
    missing = tmp_path / 'no-cifar-here'
    proc = run(TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', missing, '--epochs', 1], check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'CIFAR data set not found' in proc.stderr and str(missing) in proc.stderr
    assert 'train, test, meta' in proc.stderr and 'download failed' in proc.stderr
    assert not missing.exists()  # the folder made for the download is gone again


def test_bad_settings_fail_before_training(data, tmp_path):
    import main
    parser = main.get_args_parser()
    base = [str(a) for a in TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', data,
                                                  '--output_dir', tmp_path / 'out']]
    with pytest.raises(main.UsageError, match='fusion_layer'):  # the model's ValueError, passed on
        main.main(parser.parse_args(base + ['--fusion-strategy', 'upper', '--fusion-layer', '7']))
    with pytest.raises(main.UsageError, match='--cuda-graph needs --device cuda'):
        main.main(parser.parse_args(base + ['--cuda-graph', '--no_amp']))
    with pytest.raises(main.UsageError, match='--eval needs --resume'):
        main.main(parser.parse_args(base + ['--eval']))
    with pytest.raises(main.UsageError, match='--dist-backend nccl needs --device cuda; with --device cpu use gloo'):
        main.main(parser.parse_args(base + ['--dist-backend', 'nccl']))
    assert not os.listdir(tmp_path)


def test_more_nccl_processes_than_gpus_are_refused_and_gloo_shares_them(monkeypatch):
    import main
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('WORLD_SIZE', '3')
    monkeypatch.setenv('LOCAL_RANK', '2')
    parser = main.get_args_parser()
    with pytest.raises(main.UsageError, match=r'local rank 2, but 2 GPU\(s\) are visible: NCCL takes one GPU per'):
        main.check_args(parser.parse_args(['--device', 'cuda']))
    main.check_args(parser.parse_args(['--device', 'cuda', '--dist-backend', 'gloo']))
    monkeypatch.setenv('LOCAL_RANK', '1')
    main.check_args(parser.parse_args(['--device', 'cuda']))


def test_slurm_tasks_join_a_group_and_a_plain_run_inside_a_job_is_one_process(monkeypatch):
    import main
    import utils
    parser = main.get_args_parser()
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_STEP_NUM_TASKS'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SLURM_PROCID', '0')  # a batch script's own environment: `python main.py` in it
    monkeypatch.setenv('SLURM_NTASKS', '4')
    args = parser.parse_args(['--device', 'cpu'])
    main.check_args(args)
    utils.init_distributed_mode(args)
    assert not args.distributed and (args.rank, args.world_size) == (0, 1)
    monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '4')  # srun's tasks, without the rendezvous address
    monkeypatch.setenv('SLURM_PROCID', '3')
    with pytest.raises(main.UsageError, match='srun started 4 tasks, but MASTER_ADDR and MASTER_PORT are not set'):
        main.check_args(parser.parse_args(['--device', 'cpu']))
    monkeypatch.setenv('MASTER_ADDR', 'node1')
    monkeypatch.setenv('MASTER_PORT', '29500')
    main.check_args(args)
    joined = {}
    monkeypatch.setattr(utils.dist, 'init_process_group', lambda **kw: joined.update(kw))
    monkeypatch.setattr(utils.dist, 'barrier', lambda: None)
    monkeypatch.setattr(utils, 'setup_for_distributed', lambda is_master: None)
    utils.init_distributed_mode(args)
    assert args.distributed and joined == dict(backend='gloo', init_method='env://', world_size=4, rank=3)


def test_cuda_graph_default_captures_every_optimizer_and_says_where_the_update_is_eager(capsys):
    import main
    parser = main.get_args_parser()
    for opt, eager_update in (('adamw', False), ('sgd', True), ('lamb', True)):
        args = parser.parse_args(['--device', 'cuda', '--opt', opt])
        main.resolve_cuda_graph(args)
        assert args.cuda_graph is True
        notice = capsys.readouterr().out
        assert (f'--opt {opt}: forward and backward run as a CUDA graph and the update eagerly' in notice) == eager_update
    for argv, expected in ((['--device', 'cpu'], False), (['--device', 'cuda', '--no-cuda-graph'], False)):
        args = parser.parse_args(argv + ['--opt', 'sgd'])
        main.resolve_cuda_graph(args)
        assert args.cuda_graph is expected and capsys.readouterr().out == ''


def test_finetune_from_a_vim_checkpoint_with_a_middle_class_token(data, tmp_path):
    import main
    name = 'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'
    size = dict(img_size=32, depth=4, embed_dim=32, patch_size=8)
    src = timm.create_model(name, num_classes=10, cls_position='middle', **size).state_dict()
    torch.save({'model': src}, tmp_path / 'vim.pth')
    parser = main.get_args_parser()
    base = [str(a) for a in TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--data-path', data, '--batch-size', BATCH,
                                                  '--finetune', tmp_path / 'vim.pth']]
    # lr 0 for one epoch: the saved weights are exactly what --finetune loaded
    main.main(parser.parse_args(base + ['--epochs', '1', '--lr', '0', '--unscale-lr', '--no-model-ema',
                                        '--output_dir', str(tmp_path / 'out')]))
    got = torch.load(tmp_path / 'out' / 'checkpoint.pth', map_location='cpu', weights_only=False)['model']
    assert got['head.weight'].shape == (100, 32)  # the 10-class head was dropped for a new 100-class one
    assert torch.equal(got['pos_embed'][0, 0], src['pos_embed'][0, 8])  # middle (16 // 2) -> head
    assert all(torch.equal(got[k], src[k]) for k in src if not k.startswith(('head.', 'pos_embed')))
    # a checkpoint of another width fails, naming the keys
    wide = timm.create_model(name, num_classes=10, **dict(size, embed_dim=48)).state_dict()
    torch.save({'model': wide}, tmp_path / 'wide.pth')
    with pytest.raises(main.UsageError, match=r'size mismatch.*cls_token: checkpoint \(1, 1, 48\) vs model \(1, 1, 32\)'):
        main.main(parser.parse_args(base + ['--finetune', str(tmp_path / 'wide.pth'), '--epochs', '1']))
