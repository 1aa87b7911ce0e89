"""The run scripts produce the paper's configurations; collect_results turns summaries into the table."""
import importlib.util
import json
import os
import shlex
import subprocess

import pytest

from pipeline_helpers import REPO

TINY = 'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'
SMALL = 'vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'


def dry_run(script, *extra, **env):
    out = subprocess.run(['bash', os.path.join('scripts', script), *extra], cwd=REPO, check=True, text=True,
                         capture_output=True, env=dict(os.environ, DRY_RUN='1', **env)).stdout
    return [shlex.split(line) for line in out.splitlines()]


def parse(cmd):
    """main.py's parsed flags for one printed command (checks that main.py accepts every flag)."""
    import main
    return cmd[:cmd.index('main.py')], main.get_args_parser().parse_args(cmd[cmd.index('main.py') + 1:])


def settings(script, **env):
    return [(a.model, a.fusion_strategy, a.fusion_layer, a.fusion_token)
            for _, a in map(parse, dry_run(script, **env))]


def test_table1_runs_both_models_with_the_papers_settings():
    cmds = dry_run('table1.sh')
    expected = [(m, s, l, t) for m in (TINY, SMALL) for s, l, t in
                [('no', 0, 0), ('all', 0, 7), ('interleaved', 0, 14), ('lower', 19, 9), ('upper', 4, 9)]]
    assert settings('table1.sh') == expected
    launcher, a = parse(cmds[0])
    assert '--nproc_per_node=4' in launcher  # the paper: 4 GPUs x batch 128, fp32, drop-path 0, wd 0.1
    assert (a.batch_size, a.if_amp, a.drop_path, a.weight_decay, a.data_set) == (128, False, 0.0, 0.1, 'CIFAR')
    assert a.data_path == './datasets/cifar-100-python' and a.output_dir == './output/table1/vim_ti_no'
    assert len({parse(c)[1].output_dir for c in cmds}) == 10


def test_table2_starting_layer_k_is_fusion_layer_k_minus_2():
    pairs = [(15, 15), (14, 14), (13, 13), (12, 12), (12, 11), (11, 10), (10, 9), (10, 8), (9, 7), (9, 6),
             (8, 5), (8, 4), (7, 3), (7, 2)]
    assert settings('table2.sh') == [(TINY, 'upper', k - 2, r) for r, k in pairs]


def test_table3_and_readme_example():
    assert settings('table3.sh') == [(TINY, 'upper', 4, r) for r in range(1, 10)]
    (cmd,) = dry_run('readme_example.sh', '--epochs', '2', NGPUS='2', DATA_PATH='/d', OUTPUT_ROOT='/o')
    launcher, a = parse(cmd)
    assert '--nproc_per_node=2' in launcher
    assert (a.fusion_strategy, a.fusion_layer, a.fusion_token, a.num_workers, a.epochs) == ('upper', 4, 8, 25, 2)
    assert a.data_path == '/d' and a.output_dir.startswith('/o/')


def load_collect():
    spec = importlib.util.spec_from_file_location('collect_results', os.path.join(REPO, 'scripts', 'collect_results.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_summary(folder, model, strategy, layer, token, acc1, acc5, seconds, mem):
    os.makedirs(folder)
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
        json.dump({'model': model, 'best_acc1': acc1, 'best_acc5': acc5, 'final_acc1': acc1 - 1,
                   'final_acc5': acc5 - 1, 'total_time_s': seconds, 'max_peak_mem_mib': mem,
                   'args': {'fusion_strategy': strategy, 'fusion_layer': layer, 'fusion_token': token}}, f)


def test_collect_results_builds_the_paper_table_with_deltas(tmp_path, capsys):
    # the paper's Vim-Ti none / upper / lower rows (Table 1)
    write_summary(tmp_path / 'b', TINY, 'upper', 4, 9, 70.5, 90.5, 4 * 3600 + 8 * 60 + 40, 5996)
    write_summary(tmp_path / 'a', TINY, 'no', 0, 0, 70.1, 90.6, 4 * 3600 + 33 * 60 + 2, 8302)
    write_summary(tmp_path / 'c', TINY, 'lower', 19, 9, 62.2, 86.1, 3 * 3600 + 55 * 60 + 56, 4741)
    (tmp_path / 'unfinished').mkdir()
    load_collect().main(['--root', str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [[c.strip() for c in ln.strip('|').split('|')] for ln in lines[2:]]
    assert [r[1] for r in rows] == ['none', 'lower (L=19, r=9)', 'upper (L=4, r=9)']
    assert rows[0][:6] == ['Vim-Ti', 'none', '70.1', '90.6', '4:33:02', '8302']
    assert rows[2] == ['Vim-Ti', 'upper (L=4, r=9)', '70.5', '90.5', '4:08:40', '5996', '+0.4', '-0.1',
                       f'{14920 / 16382:.2f}', f'{5996 / 8302:.2f}']
    assert rows[1][6:] == ['-7.9', '-4.5', f'{14156 / 16382:.2f}', f'{4741 / 8302:.2f}']


def test_collect_results_final_metric_and_missing_baseline(tmp_path, capsys):
    write_summary(tmp_path / 'x', SMALL, 'all', 0, 7, 68.9, 89.3, 21676, None)
    load_collect().main([str(tmp_path / 'x'), '--metric', 'final'])
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert [c.strip() for c in row.strip('|').split('|')] == ['Vim-S', 'all (r=7)', '67.9', '88.3', '6:01:16',
                                                              '-', '-', '-', '-', '-']
    with pytest.raises(SystemExit):
        load_collect().main([str(tmp_path / 'nothing')])
