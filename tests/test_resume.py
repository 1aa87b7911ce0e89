"""Runs that survive what clusters do to them (issue 17): resume with changed flags, resubmitted finished runs,
kills between the checkpoint and the log, re-runs into a used folder, clear errors, what summary.json records.

Most runs are main.main() in this process (a tiny Vim, 64 CIFAR-format images, 4 steps per epoch); a kill -9 runs
main.py in a subprocess with the fault point FAMBA_V_FAULT set."""
import contextlib
import io
import json
import math
import os
import shutil
import stat
import subprocess

import pytest
import torch

import engine
import main
import utils
from pipeline_helpers import QUIET, REPO, TINY_MODEL, read_log, read_summary, run, write_cifar100

BATCH = 16
# upper-layer fusion above layer 1 asking for 10 tokens per layer: 17 tokens -> at most 8, then 4 (capped);
# cosine from lr 0.01 to 0, no warmup or cooldown: lr(epoch e of E) = 0.005 * (1 + cos(pi * e / E))
TRAIN = TINY_MODEL + QUIET + ['--data-set', 'CIFAR', '--batch-size', BATCH, '--fusion-strategy', 'upper',
                              '--fusion-layer', 1, '--fusion-token', 10, '--lr', 0.01, '--unscale-lr', '--min-lr', 0,
                              '--cooldown-epochs', 0]
RUN_FILES = ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'summary.json']


class Crash(Exception):
    """Stands for the process dying at a fault point (in-process runs)."""


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_cifar100(root / 'cifar-100-python', n_train=64, n_test=24)
    return str(root)


def train(data, out, *extra, flags=TRAIN):
    args = main.get_args_parser().parse_args([str(a) for a in flags + ['--data-path', data, '--output_dir', out]
                                              + list(extra)])
    return main.main(args)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def contents(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def crash_at(monkeypatch, tag):
    def fault_point(t):
        if t == tag:
            raise Crash(t)
    monkeypatch.setattr(utils, 'fault_point', fault_point)


@pytest.fixture(scope='module')
def first(data, tmp_path_factory, one_thread):
    """One finished 1-epoch run into a folder that exists (the run scripts mkdir -p it) and holds a job log."""
    out = tmp_path_factory.mktemp('first')
    (out / 'job.out').write_text('scheduler output\n')
    stdout = io.StringIO()
    old = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(stdout):
            train(data, out, '--epochs', 1)
    finally:
        os.umask(old)
    return out, stdout.getvalue()


def test_a_first_run_writes_plain_files_and_a_full_summary(first):
    out, stdout = first
    assert sorted(os.listdir(out)) == sorted(RUN_FILES + ['job.out'])
    assert (out / 'job.out').read_text() == 'scheduler output\n'  # other files neither block nor get touched
    # 0666 less the umask 022, as for any file (mkstemp alone gives 0600)
    assert {n: stat.S_IMODE((out / n).stat().st_mode) for n in RUN_FILES} == {n: 0o644 for n in RUN_FILES}
    # the cap: 17 tokens enter layer 2, which can fuse (17 - 1) // 2 = 8; 9 enter layer 3: (9 - 1) // 2 = 4
    assert ('Note: --fusion-token 10 is more than layers [2, 3] can fuse (half of the tokens entering a layer, '
            'class token aside): they remove [8, 4] tokens') in stdout
    s, log = read_summary(out), read_log(out)
    assert [e['epoch'] for e in log] == [0] and log[0]['train_lr'] == 0.01
    assert s['best_epoch'] == 0 and s['final_epoch'] == 0 and s['final_acc1'] == log[0]['test_acc1']
    assert s['architecture'] == {'depth': 4, 'embed_dim': 32, 'patch_size': 8, 'stride': 8, 'input_size': 32,
                                 'num_classes': 100, 'cls_position': 'head'}
    assert s['torch_version'] == torch.__version__ and s['gpus'] == [] and s['device'] == 'cpu'
    try:
        head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    assert s['git_commit'] == head and s['resumes'] == []
    assert load(out / 'checkpoint.pth')['history'] == log  # the log is written from the checkpoint's history


def test_running_again_into_a_used_output_dir_resumes_the_same_run_and_refuses_another(first, data, tmp_path):
    out, _ = first
    runs = tmp_path / 'run'
    shutil.copytree(out, runs)
    before = contents(runs)
    # other flags: refused, naming them, before anything is built or written (lr 0.02 is not the run's 0.01)
    with pytest.raises(main.UsageError, match=r'--output_dir .* already holds a run \(checkpoint.pth of epoch 0\) '
                                              r'with other flags: --lr 0.02 \(checkpoint: 0.01\)\. To continue it '
                                              r'with these flags add --resume .*checkpoint.pth'):
        train(data, runs, '--epochs', 1, '--lr', 0.02)
    with pytest.raises(main.UsageError, match=r'--epochs 3 \(checkpoint: 1\)'):
        train(data, runs, '--epochs', 3)
    other = tmp_path / 'other'
    shutil.copytree(out, other)
    with pytest.raises(main.UsageError, match='holds another run'):  # would overwrite that run's files
        train(data, other, '--epochs', 2, '--resume', runs / 'checkpoint.pth')
    assert contents(runs) == before and contents(other) == before
    (other / 'checkpoint.pth').unlink()
    with pytest.raises(main.UsageError, match=r'already holds files of a run \(best_checkpoint.pth, log.txt, '
                                              r'summary.json\) but no checkpoint.pth'):
        train(data, other, '--epochs', 1)
    # the same command again: the run is resumed; finished, it is reported and nothing is trained
    s = train(data, runs, '--epochs', 1)
    assert s['final_acc1'] == read_summary(out)['final_acc1'] and s['args']['resume'] == str(runs / 'checkpoint.pth')
    assert {n: b for n, b in contents(runs).items() if n != 'summary.json'} == \
        {n: b for n, b in before.items() if n != 'summary.json'}


def test_resume_with_more_epochs_and_a_lower_lr_uses_the_schedule_of_the_new_flags(first, data, tmp_path):
    out, _ = first
    runs = tmp_path / 'run'
    shutil.copytree(out, runs)
    s = train(data, runs, '--epochs', 2, '--lr', 0.004, '--resume', runs / 'checkpoint.pth')
    log = read_log(runs)
    assert [e['epoch'] for e in log] == [0, 1] and log[0] == read_log(out)[0]
    # a 2-epoch cosine from 0.004 to 0, at epoch 1: 0.002 * (1 + cos(pi / 2)); the checkpoint's 1-epoch
    # schedule from 0.01 would have given its minimum, 0
    assert log[1]['train_lr'] == pytest.approx(0.002, rel=1e-12)
    groups = load(runs / 'checkpoint.pth')['optimizer']['param_groups']
    assert {g['lr'] for g in groups} == {log[1]['train_lr']} and {g['initial_lr'] for g in groups} == {0.004}
    assert s == read_summary(runs) | {'args': s['args']}
    assert s['args']['lr'] == 0.004 and s['args']['epochs'] == 2 and s['final_epoch'] == 1
    assert s['resumes'] == [{'epoch': 1, 'checkpoint': str(runs / 'checkpoint.pth'),
                             'changed': {'epochs': [1, 2], 'lr': [0.01, 0.004]}}]


def test_resuming_a_finished_run_reports_it_and_trains_nothing(first, data, tmp_path):
    out, _ = first
    runs = tmp_path / 'run'
    shutil.copytree(out, runs)
    before, summary = contents(runs), read_summary(out)
    s = train(data, runs, '--epochs', 1, '--resume', runs / 'checkpoint.pth')
    for key in ('best_acc1', 'best_acc5', 'best_epoch', 'final_acc1', 'final_acc5', 'final_ema_acc1', 'final_epoch',
                'max_peak_mem_mib', 'n_parameters', 'fusion', 'architecture', 'resumes'):
        assert s[key] == summary[key], key
    assert s['final_acc1'] is not None and read_summary(runs)['final_acc1'] == summary['final_acc1']
    elapsed = load(runs / 'checkpoint.pth')['elapsed_s']
    assert elapsed <= s['total_time_s'] < elapsed + 30  # nothing left to train: only the setup's seconds
    assert {n: b for n, b in contents(runs).items() if n != 'summary.json'} == \
        {n: b for n, b in before.items() if n != 'summary.json'}  # checkpoints and log untouched


def test_a_kill_between_checkpoint_and_log_is_repaired(data, tmp_path, monkeypatch, one_thread):
    out = tmp_path / 'run'
    args = ['--data-path', data, '--output_dir', out, '--epochs', 2]
    # 1. kill -9 while log.txt of epoch 0 is written (after both checkpoints): no log, a temp file left
    proc = run(TRAIN + args, check=False, env={'FAMBA_V_FAULT': 'before_replace:log.txt'})
    assert proc.returncode == -9
    (tmp, *names) = sorted(os.listdir(out))
    assert names == ['best_checkpoint.pth', 'checkpoint.pth']
    assert tmp.startswith('.tmp-') and tmp.endswith('.txt')
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['epoch'] == 0 and [e['epoch'] for e in ckpt['history']] == [0]
    # 2. the resume cleans the temp file and writes the log from the checkpoint; then a crash right after
    #    epoch 1's checkpoint (before its best checkpoint and log line)
    crash_at(monkeypatch, 'after_checkpoint:1')
    with pytest.raises(Crash):
        train(data, out, '--epochs', 2, '--resume', out / 'checkpoint.pth')
    assert sorted(os.listdir(out)) == RUN_FILES[:3]
    assert read_log(out) == ckpt['history']  # epoch 0 only: one behind the checkpoint
    history = load(out / 'checkpoint.pth')['history']
    assert [e['epoch'] for e in history] == [0, 1] and history[0] == ckpt['history'][0]
    monkeypatch.undo()
    # 3. fewer epochs than the checkpoint has trained: refused before anything is touched
    before = contents(out)
    with pytest.raises(main.UsageError, match='--epochs 1, but .* has trained 2 epochs already'):
        train(data, out, '--epochs', 1, '--resume', out / 'checkpoint.pth')
    assert contents(out) == before
    # 4. the same command again (a resubmitted job, no --resume): log and best checkpoint back in step with the
    #    checkpoint, the finished run reported
    s = train(data, out, '--epochs', 2)
    assert sorted(os.listdir(out)) == RUN_FILES
    assert read_log(out) == history
    best = 0 if history[0]['test_acc1'] >= history[1]['test_acc1'] else 1
    assert s['best_epoch'] == best and load(out / 'best_checkpoint.pth')['epoch'] == best
    assert s['final_acc1'] == history[1]['test_acc1'] and s['best_acc1'] == history[best]['test_acc1']
    assert s['final_ema_acc1'] == history[1]['test_ema_acc1']


def test_training_on_removes_the_old_summary_and_a_new_folder_gets_the_best_checkpoint(first, data, tmp_path,
                                                                                        monkeypatch, one_thread):
    """A finished run extended with more --epochs and killed before its end keeps no summary.json of the shorter
    run (the log goes further than it); a --resume into another folder brings the best checkpoint along."""
    out = tmp_path / 'run'
    shutil.copytree(first[0], out)
    crash_at(monkeypatch, 'after_log:1')
    with pytest.raises(Crash):
        train(data, out, '--epochs', 3, '--resume', out / 'checkpoint.pth')
    monkeypatch.undo()
    assert 'summary.json' not in os.listdir(out) and [e['epoch'] for e in read_log(out)] == [0, 1]
    other = tmp_path / 'other'
    history = load(out / 'checkpoint.pth')['history']
    best = 0 if history[0]['test_acc1'] >= history[1]['test_acc1'] else 1
    # lr 0: epoch 2 has epoch 1's weights and accuracy, so the best stays the first folder's
    s = train(data, other, '--epochs', 3, '--resume', out / 'checkpoint.pth', '--lr', 0)
    assert sorted(os.listdir(other)) == RUN_FILES and [e['epoch'] for e in read_log(other)] == [0, 1, 2]
    assert s['best_epoch'] == best and load(other / 'best_checkpoint.pth')['epoch'] == best
    assert contents(other)['best_checkpoint.pth'] == contents(out)['best_checkpoint.pth']


def test_resume_with_the_schedule_on_updates_continues_like_an_uninterrupted_run(data, tmp_path, monkeypatch,
                                                                                  one_thread):
    flags = TRAIN + ['--sched-on-updates', '--warmup-epochs', 1, '--no-model-ema']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    train(data, straight, '--epochs', 2, flags=flags)
    crash_at(monkeypatch, 'after_log:0')
    with pytest.raises(Crash):
        train(data, resumed, '--epochs', 2, flags=flags)
    monkeypatch.undo()
    train(data, resumed, '--epochs', 2, '--resume', resumed / 'checkpoint.pth', flags=flags)
    a, b = read_log(straight), read_log(resumed)
    for key in ('train_loss', 'train_lr', 'test_loss', 'test_acc1'):
        assert [e[key] for e in a] == [e[key] for e in b], key
    wa, wb = load(straight / 'checkpoint.pth')['model'], load(resumed / 'checkpoint.pth')['model']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_with_other_fusion_settings_warns_and_a_training_resume_refuses(first, data, tmp_path, capsys):
    out, _ = first
    ckpt = out / 'checkpoint.pth'
    stats = train(data, tmp_path / 'same', '--eval', '--resume', ckpt)
    assert 'settings_differ_from_checkpoint' not in stats and 'warning' not in capsys.readouterr().err
    stats = train(data, tmp_path / 'other', '--eval', '--resume', ckpt, '--fusion-token', 2)
    err = capsys.readouterr().err
    assert 'main.py: warning: --eval with model settings that differ from' in err and \
        '--fusion-token 2 (checkpoint: 10)' in err
    assert stats['settings_differ_from_checkpoint'] == ['--fusion-token 2 (checkpoint: 10)']
    assert json.load(open(tmp_path / 'other' / 'eval.json'))['settings_differ_from_checkpoint'] == \
        ['--fusion-token 2 (checkpoint: 10)']
    with pytest.raises(main.UsageError, match=r"model settings differ from the checkpoint's: "
                                              r"--fusion-strategy no \(checkpoint: upper\)"):
        train(data, tmp_path / 'train', '--epochs', 2, '--resume', ckpt, '--fusion-strategy', 'none')
    assert not (tmp_path / 'train').exists()


def test_foreign_checkpoints_are_checked_through_their_namespace_or_said_unchecked(first, data, tmp_path, capsys):
    """DeiT-style code (Vim's, the Famba-V release's) saves its argparse.Namespace as 'args'; official Vim weights
    hold no flags at all, so nothing about their class token can be checked, which --eval must say."""
    import argparse
    saved = load(first[0] / 'checkpoint.pth')
    torch.save({**saved, 'args': argparse.Namespace(**{**saved['args'], 'fusion_token': 2})}, tmp_path / 'deit.pth')
    torch.save({'model': saved['model']}, tmp_path / 'vim.pth')
    train(data, tmp_path / 'a', '--eval', '--resume', tmp_path / 'deit.pth')
    err = capsys.readouterr().err
    assert '--fusion-token 10 (checkpoint: 2)' in err and 'holds no flags' not in err
    with pytest.raises(main.UsageError, match=r'--fusion-token 10 \(checkpoint: 2\)'):
        train(data, tmp_path / 'b', '--epochs', 2, '--resume', tmp_path / 'deit.pth')
    stats = train(data, tmp_path / 'c', '--eval', '--resume', tmp_path / 'vim.pth')
    assert 'test_acc1' in stats and not any(k.startswith('test_ema') for k in stats)  # no EMA copy to evaluate
    err = capsys.readouterr().err
    assert 'holds no flags' in err and '--cls-position head' in err and len(err.strip().splitlines()) == 1


def test_unusable_resume_files_are_one_line_errors(first, data, tmp_path):
    out, _ = first
    raw = (out / 'checkpoint.pth').read_bytes()
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'truncated.pth').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'notes.pth').write_text('not a checkpoint\n')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    torch.save({'model': load(out / 'checkpoint.pth')['model']}, tmp_path / 'weights.pth')
    cases = [('missing.pth', 'no such file'), ('empty.pth', r'is empty \(0 bytes\)'),
             ('truncated.pth', 'cannot be read as a checkpoint'), ('notes.pth', 'cannot be read as a checkpoint'),
             ('tensor.pth', 'is not a checkpoint of main.py'), ('.', 'is a folder')]
    for mode in ([], ['--eval']):
        for name, message in cases:
            with pytest.raises(main.UsageError, match=f'--resume {tmp_path / name}.*{message}'):
                train(data, tmp_path / 'out', '--epochs', 1, '--resume', tmp_path / name, *mode)
    with pytest.raises(main.UsageError, match='holds no training state'):
        train(data, tmp_path / 'out', '--epochs', 1, '--resume', tmp_path / 'weights.pth')
    assert not (tmp_path / 'out').exists()


def test_bad_flags_are_reported_before_the_data_and_the_model(first, tmp_path):
    out, _ = first
    (tmp_path / 'a_file').write_text('')
    nodata = str(tmp_path / 'no-data-here')  # these errors must come before the data set would be looked for
    cases = [(['--ssm-backend', 'triton'], '--ssm-backend triton runs on CUDA tensors only'),
             (['--model', 'vim_tiny'], "unknown --model 'vim_tiny'; the models are: .*" + main.DEFAULT_MODEL),
             (['--epochs', 0], '--epochs must be >= 1, got 0'),
             (['--output_dir', tmp_path / 'a_file' / 'out'], f'{tmp_path / "a_file"} is a file, not a folder'),
             (['--output_dir', tmp_path / 'a_file', '--eval', '--resume', out / 'checkpoint.pth'], 'is a file'),
             (['--depth', 0], '--depth must be >= 1, got 0'),
             (['--patch-size', 64], 'cannot build .*img_size=32 is smaller than patch_size=64'),
             (['--drop-path', 2], r'--drop-path must be in \[0, 1\], got 2.0'),
             (['--lr', -1], '--lr must be >= 0, got -1.0'),
             (['--num_workers', -1], '--num_workers must be >= 0, got -1'),
             (['--opt', 'nosuch'], "unknown --opt 'nosuch'; timm has: .*adamw"),
             (['--fusion-layer', 7], 'cannot build .*fusion_layer'),
             (['--finetune', tmp_path / 'gone.pth'], 'no such file'),
             (['--epochs', 2, '--resume', out / 'checkpoint.pth', '--depth', 3],
              r'does not fit the model these flags build \(--depth 3 \(checkpoint: 4\)\): unexpected keys \(17\)'),
             (['--eval', '--resume', out / 'checkpoint.pth', '--embed-dim', 48],
              r'\(--embed-dim 48 \(checkpoint: 32\)\): size mismatch \(\d+\): cls_token: checkpoint')]
    for extra, message in cases:
        with pytest.raises(main.UsageError, match=message):
            train(nodata, tmp_path / 'out', '--epochs', 1, *extra)
    assert sorted(os.listdir(tmp_path)) == ['a_file']


def test_a_finetune_file_that_is_no_checkpoint_is_a_usage_error(data, tmp_path):
    (tmp_path / 'notes.pth').write_text('not a checkpoint\n')
    torch.save([1, 2], tmp_path / 'list.pth')
    for name, message in (('notes.pth', r'cannot be read as a checkpoint \(truncated'), ('list.pth', 'holds no state dict')):
        with pytest.raises(main.UsageError, match=f'--finetune {tmp_path / name} {message}'):
            train(data, tmp_path / 'out', '--epochs', 1, '--finetune', tmp_path / name)
    assert not (tmp_path / 'out').exists()


def test_main_py_reports_a_bad_resume_file_in_one_line(tmp_path):
    proc = run(TINY_MODEL + QUIET + ['--resume', tmp_path / 'gone.pth', '--epochs', 1], check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f'main.py: error: --resume {tmp_path / "gone.pth"}: no such file'
    proc = run(TINY_MODEL + QUIET + ['--epochs', 'abc'], check=False)  # argparse's errors: one line as well
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "main.py: error: argument --epochs: invalid int value: 'abc' (main.py --help lists the flags)"]


@pytest.mark.parametrize('amp_dtype, advice', [(None, None), (torch.float16, ', or train with --no_amp (fp32) or '
                                                                             '--amp-dtype bfloat16'),
                                               (torch.bfloat16, ', or train with --no_amp (fp32);')])
def test_the_non_finite_message_only_suggests_switching_precision_when_amp_is_on(amp_dtype, advice):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))] * 2
    with pytest.raises(engine.NonFiniteLossError) as err:
        engine.train_one_epoch(model, lambda x, y: torch.tensor(math.inf), loader, opt, torch.device('cpu'), 0,
                               print_freq=1, amp_dtype=amp_dtype)
    msg = str(err.value)
    assert 'Lower --lr (a --resume takes the new value), set --clip-grad' in msg
    if advice is None:
        assert 'no_amp' not in msg and 'amp-dtype' not in msg
    else:
        assert advice in msg


def test_checkpoints_from_before_the_history_take_it_from_their_log(tmp_path):
    # a log appended to by re-runs into the same folder (epochs 0, 1, 0, 1, 2) and a checkpoint of epoch 1:
    # the last line of each epoch up to the checkpoint's
    lines = [{'epoch': 0, 'v': 'a'}, {'epoch': 1, 'v': 'b'}, {'epoch': 0, 'v': 'c'}, {'epoch': 1, 'v': 'd'},
             {'epoch': 2, 'v': 'e'}]
    (tmp_path / 'log.txt').write_text('\n'.join(json.dumps(e) for e in lines) + '\n{"epoch": 3, "v": \n')
    assert main._history_from_log(str(tmp_path / 'checkpoint.pth'), 1) == [lines[2], lines[3]]
    assert main._history_from_log(str(tmp_path / 'elsewhere' / 'checkpoint.pth'), 1) == []
