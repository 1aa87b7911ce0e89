"""Shared helpers for the pipeline tests: tiny data sets in the real on-disk formats, and running main.py."""
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 4-layer, 32-wide Vim on 32 px images with 8 px patches: 16 patches + the class token = 17 tokens.
TINY_MODEL = ['--depth', '4', '--embed-dim', '32', '--patch-size', '8', '--input-size', '32']
# Everything that makes a CPU test slow or noisy switched off; the tests switch back on what they check.
QUIET = ['--device', 'cpu', '--num_workers', '0', '--no-pin-mem', '--warmup-epochs', '0', '--drop-path', '0',
         '--print-freq', '2', '--ssm-backend', 'torch']


def write_cifar100(folder, n_train=64, n_test=24, n_classes=100, seed=0):
    """Write train/test/meta pickles as in cifar-100-python (the official files are Python 2 pickles
    whose keys and names load as str with encoding='latin1'; 'data' is an (N, 3072) uint8 array of
    R, G, B planes, labels are lists of int)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)

    def split(name, n):
        labels = rng.integers(0, n_classes, size=n)
        entry = {'filenames': [f'{name}_{i}.png' for i in range(n)], 'batch_label': name,
                 'fine_labels': labels.tolist(), 'coarse_labels': (labels // 5).tolist(),
                 'data': rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump(entry, f, protocol=2)
        return entry

    train, test = split('train', n_train), split('test', n_test)
    meta = {'fine_label_names': [f'class{i}' for i in range(n_classes)],
            'coarse_label_names': [f'super{i}' for i in range(20)]}
    with open(os.path.join(folder, 'meta'), 'wb') as f:
        pickle.dump(meta, f, protocol=2)
    return train, test


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args, *, launcher=None, timeout=300, check=True, threads=1, env=None):
    """Run main.py (optionally under a launcher prefix) in a subprocess; returns CompletedProcess.

    One thread by default: the runs are tiny, and a fixed thread count keeps CPU results reproducible.
    ``env``: more environment variables (e.g. the fault point FAMBA_V_FAULT)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1', **(env or {}))
    cmd = [sys.executable] + (launcher or []) + ['main.py'] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n'
                             f'{proc.stderr[-4000:]}')
    return proc


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_summary(output_dir):
    with open(os.path.join(output_dir, 'summary.json')) as f:
        return json.load(f)
