"""scripts/ddp_benchmark.sh and ddp_scaling.py: the multi-process benchmark's plumbing, on the CPU over gloo."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from pipeline_helpers import REPO


def load_scaling():
    spec = importlib.util.spec_from_file_location('ddp_scaling', os.path.join(REPO, 'scripts', 'ddp_scaling.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(world, step_ms, images_per_s, strategy='none'):
    return {'model': 'vim_tiny_x', 'ssm_backend': 'triton', 'precision': 'fp32', 'batch_size': 128, 'mode': 'ddp',
            'variant': 'default', 'strategy': strategy, 'world_size': world, 'step_ms': step_ms,
            'images_per_s': images_per_s, 'peak_mib': 8000.0, 'time_vs_none': 1.0}


def test_scaling_efficiency_is_images_per_second_over_n_times_one_gpu():
    rows = load_scaling().scaling_rows([row(1, 100.0, 1280.0)], [row(4, 110.0, 4608.0)])
    assert rows[0]['efficiency'] == pytest.approx(4608.0 / (4 * 1280.0))  # 0.9
    assert (rows[0]['step_ms_1'], rows[0]['step_ms_n'], rows[0]['world_size']) == (100.0, 110.0, 4)
    with pytest.raises(SystemExit, match='no one-process run'):
        load_scaling().scaling_rows([row(1, 100.0, 1280.0)], [row(4, 90.0, 5000.0, strategy='all r7')])


@pytest.mark.parametrize('launcher', ['torchrun', 'launch'])
def test_ddp_benchmark_script_runs_one_and_two_processes(launcher, tmp_path):
    tiny = ['--device', 'cpu', '--depth', '2', '--embed-dim', '16', '--patch-size', '8', '--input-size', '32',
            '--batch-sizes', '2', '--steps', '1', '--warmup', '1', '--strategies', 'none', 'all:3']
    env = dict(os.environ, NGPUS='2', MODES='ddp-eager', OUTPUT_ROOT=str(tmp_path), OMP_NUM_THREADS='1',
               PYTHON=sys.executable, LAUNCHER=launcher)
    proc = subprocess.run(['bash', 'scripts/ddp_benchmark.sh', *tiny], cwd=REPO, env=env, text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.load(open(tmp_path / f'ddp_x{n}.json'))['results'] for n in (1, 2))
    assert [r['world_size'] for r in one] == [1, 1] and [r['world_size'] for r in two] == [2, 2]
    for r in two:  # images/s count both processes' batches
        assert r['images_per_s'] == pytest.approx(2 * 2 / r['step_ms'] * 1e3)
    rows = json.load(open(tmp_path / 'scaling_x2.json'))
    assert [r['strategy'] for r in rows] == ['none', 'all r3']
    for r, a, b in zip(rows, one, two):
        assert r['efficiency'] == pytest.approx(b['images_per_s'] / (2 * a['images_per_s']))
    assert '| 2 |' in proc.stdout  # the table's GPU column
