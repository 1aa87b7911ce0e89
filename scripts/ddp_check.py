"""Checks of one several-process training run: what rank 0 writes, the ranks' parameters, resuming after a kill,
--dist-eval against one process, and the eager DDP step against the captured one.

    python scripts/ddp_check.py --nproc 2 --output-root output/ddp_check -- MAIN.PY FLAGS (data, model, --epochs >= 2)

main.py with FLAGS, launched through ``torch.distributed.launch --use_env`` (``--launcher torchrun``: torchrun)
but for eval:
  run       the run, with --dist-eval;
  resumed   the same run, killed with SIGKILL right after its first checkpoint (main.py's fault point, as a
            cluster's kill) and launched again exactly as before, which resumes it;
  eval      one process evaluating run's final checkpoint (main.py --eval --resume);
  eager     on CUDA, the run with --no-cuda-graph: DistributedDataParallel's eager step against the captured one.
Checked: run and resumed hold main.py's run files only and one log line per epoch (rank 0 writes alone); every
rank ends with the same parameters (summary.json's param_checksums, a sum and a sum of squares per rank); resumed
ends with run's parameters and log (timing fields aside); eval's top-1 / top-5 images equal --dist-eval's, within
--eval-tolerance images (a one-process evaluation batches the images differently, and a GEMM may round otherwise);
eager ends with run's parameters within 1e-3 (the difference's norm over all of them, relative to theirs). With
two processes the two steps' all-reduce is one addition, and they end bit for bit equal (the report says whether
they did); with more, DDP's buckets and the captured step's flat buffer sum the processes' gradients in different
orders, and the runs drift apart by rounding (scripts/allreduce_order.py).
Prints a JSON report, writes it to OUTPUT_ROOT/ddp_check.json and exits 1 if a check fails.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from main import RUN_FILES  # noqa: E402
from utils import FAULT_ENV  # noqa: E402

LOG_KEYS = ('epoch', 'train_loss', 'train_lr', 'test_loss', 'test_acc1', 'test_acc5', 'test_images')
EAGER_TOLERANCE = 1e-3


def launch(nproc, launcher, flags, env=None, check=True):
    if launcher == 'torchrun':
        prefix = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    else:
        prefix = ['-m', 'torch.distributed.launch', '--standalone', f'--nproc_per_node={nproc}', '--use_env']
    cmd = [sys.executable] + prefix + ['main.py'] + flags
    print('==>', ' '.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})))
    if check and proc.returncode:
        sys.exit(f'ddp_check.py: error: {" ".join(cmd)} exited with {proc.returncode}')
    return proc.returncode


def read_run(folder):
    with open(os.path.join(folder, 'log.txt')) as f:
        log = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(folder, 'summary.json')) as f:
        return log, json.load(f)


def correct(entry, key):
    """Images counted right by a log / eval entry's percentage."""
    return round(entry[key] * entry['test_images'] / 100)


def parameter_difference(checkpoint_a, checkpoint_b):
    """How far the saved models' floating-point tensors are apart: ||a - b|| / ||a|| over all of them at once, the
    tensor with the largest ||a - b|| / ||a|| of its own (a zero-initialised bias that barely moved can differ in
    the same proportion as its size), and whether they are bit for bit equal."""
    a, b = (torch.load(c, map_location='cpu', weights_only=False)['model'] for c in (checkpoint_a, checkpoint_b))
    names = [k for k, t in a.items() if t.is_floating_point()]
    diff = {k: (a[k].double() - b[k].double()).norm().item() for k in names}
    size = {k: a[k].double().norm().item() for k in names}
    worst = max(names, key=lambda k: diff[k] / max(size[k], 1e-30))
    return {'relative': sum(d * d for d in diff.values()) ** 0.5 / sum(n * n for n in size.values()) ** 0.5,
            'worst_tensor': worst, 'worst_tensor_relative': diff[worst] / max(size[worst], 1e-30),
            'bitwise_equal': all(torch.equal(a[k], b[k]) for k in names)}


def check_runs(run_dir, resumed_dir, eval_file, epochs, eval_tolerance, eager_dir=None):
    """The report: each check's numbers and whether it holds."""
    (log, summary), (log_r, summary_r) = read_run(run_dir), read_run(resumed_dir)
    with open(eval_file) as f:
        single = json.load(f)
    checks = {}
    for name, folder, lines in (('run', run_dir, log), ('resumed', resumed_dir, log_r)):
        files, logged = sorted(os.listdir(folder)), [e['epoch'] for e in lines]
        checks[f'{name}_files'] = {'files': files, 'epochs_logged': logged,
                                   'ok': files == sorted(RUN_FILES) and logged == list(range(epochs))}
    for name, s in (('run', summary), ('resumed', summary_r)):
        sums = s['param_checksums']
        checks[f'{name}_ranks_equal'] = {'world_size': s['world_size'], 'param_checksums': sums,
                                         'ok': len(sums) == s['world_size'] > 1 and all(c == sums[0] for c in sums)}
    differing = [{k: (a.get(k), b.get(k)) for k in LOG_KEYS if a.get(k) != b.get(k)} for a, b in zip(log, log_r)]
    checks['resumed_equals_run'] = {
        'param_checksums': [summary['param_checksums'][0], summary_r['param_checksums'][0]],
        'log_differences': [d for d in differing if d], 'resumes': summary_r['resumes'],
        'ok': (summary['param_checksums'] == summary_r['param_checksums'] and not any(differing)
               and len(log) == len(log_r)
               and [(r['epoch'], r['changed']) for r in summary_r['resumes']] == [(1, {})])}
    dist_eval = log[-1]
    counts = {k: [correct(dist_eval, k), correct(single, k)] for k in ('test_acc1', 'test_acc5')}
    checks['dist_eval_equals_one_process'] = {
        'images': [dist_eval['test_images'], single['test_images']],
        'correct_dist_eval_vs_one_process': counts,
        'ok': dist_eval['test_images'] == single['test_images']
        and all(abs(a - b) <= eval_tolerance for a, b in counts.values())}
    if eager_dir is not None:
        log_e, _ = read_run(eager_dir)
        difference = parameter_difference(*(os.path.join(d, 'checkpoint.pth') for d in (run_dir, eager_dir)))
        losses = [[e['train_loss'] for e in lines] for lines in (log, log_e)]
        checks['eager_ddp_equals_captured'] = {**difference, 'train_loss': losses,
                                               'ok': difference['relative'] <= EAGER_TOLERANCE}
    return {'ok': all(c['ok'] for c in checks.values()), 'checks': checks}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--nproc', type=int, default=2, help='processes per launch')
    p.add_argument('--launcher', choices=['launch', 'torchrun'], default='launch')
    p.add_argument('--output-root', default='output/ddp_check')
    p.add_argument('--eval-tolerance', type=int, default=0, help='images that may differ in top-1 / top-5')
    p.add_argument('flags', nargs=argparse.REMAINDER, help='main.py flags, after --')
    args = p.parse_args()
    flags = [f for f in args.flags if f != '--']
    if '--epochs' not in flags or int(flags[flags.index('--epochs') + 1]) < 2:
        p.error('the main.py flags need --epochs N with N >= 2 (the kill comes after the first epoch)')
    if any(f in flags for f in ('--output_dir', '--resume', '--eval')):
        p.error('the main.py flags must not set --output_dir, --resume or --eval: ddp_check.py sets them')
    epochs = int(flags[flags.index('--epochs') + 1])
    root = os.path.abspath(args.output_root)
    run_dir, resumed_dir, eval_dir, eager_dir = (os.path.join(root, n) for n in ('run', 'resumed', 'eval', 'eager'))
    for d in (run_dir, resumed_dir, eval_dir, eager_dir):
        if os.path.exists(d) and os.listdir(d):
            p.error(f'{d} is not empty: give a new --output-root')

    launch(args.nproc, args.launcher, flags + ['--dist-eval', '--output_dir', run_dir])
    resumed = flags + ['--dist-eval', '--output_dir', resumed_dir]
    if launch(args.nproc, args.launcher, resumed, env={FAULT_ENV: 'after_checkpoint:0'}, check=False) == 0:
        sys.exit('ddp_check.py: error: the run to be killed after its first checkpoint finished')
    launch(args.nproc, args.launcher, resumed)
    cmd = [sys.executable, 'main.py'] + flags + ['--eval', '--resume', os.path.join(run_dir, 'checkpoint.pth'),
                                                 '--output_dir', eval_dir]
    print('==>', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    cuda = 'cpu' not in flags[flags.index('--device') + 1] if '--device' in flags else torch.cuda.is_available()
    if cuda:  # on the CPU every step is eager already
        launch(args.nproc, args.launcher, flags + ['--dist-eval', '--no-cuda-graph', '--output_dir', eager_dir])

    report = {'nproc': args.nproc, 'launcher': args.launcher, 'flags': flags,
              **check_runs(run_dir, resumed_dir, os.path.join(eval_dir, 'eval.json'), epochs, args.eval_tolerance,
                           eager_dir if cuda else None)}
    with open(os.path.join(root, 'ddp_check.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print('ddp_check.py:', 'all checks hold' if report['ok'] else
          'FAILED: ' + ', '.join(k for k, c in report['checks'].items() if not c['ok']))
    sys.exit(0 if report['ok'] else 1)


if __name__ == '__main__':
    main()
