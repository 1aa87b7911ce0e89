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


def write_run(folder, strategy, acc1, seconds, *, arch=None, world_size=1, precision='float32', **args):
    """A summary.json as main.py writes it now: architecture, world size, precision and the args."""
    os.makedirs(folder)
    token = 0 if strategy == 'no' else 2
    summary = {'model': TINY, 'best_acc1': acc1, 'best_acc5': acc1 + 10, 'final_acc1': acc1, 'final_acc5': acc1 + 10,
               'total_time_s': seconds, 'max_peak_mem_mib': None, 'epochs': args.get('epochs', 300),
               'world_size': world_size, 'precision': precision, 'device': 'cpu',
               'args': {'fusion_strategy': strategy, 'fusion_layer': 1, 'fusion_token': token, 'batch_size': 16,
                        'data_set': 'CIFAR', 'lr': 0.001, 'output_dir': str(folder), 'num_workers': 0, **args}}
    if arch is not None:
        summary['architecture'] = arch
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
        json.dump(summary, f)


def test_collect_results_compares_only_runs_of_the_same_setting(tmp_path, capsys):
    small = {'depth': 4, 'embed_dim': 32, 'patch_size': 8, 'stride': 8, 'input_size': 32}
    vim_ti = {'depth': 24, 'embed_dim': 192, 'patch_size': 16, 'stride': 16, 'input_size': 224}
    write_run(tmp_path / 'ti_no', 'no', 70.0, 1000, arch=vim_ti, epochs=1)
    write_run(tmp_path / 'ti_up', 'upper', 69.0, 800, arch=vim_ti, epochs=1)
    write_run(tmp_path / 'small_no', 'no', 10.0, 100, arch=small, epochs=1)        # listed first: the old table
    write_run(tmp_path / 'small_up', 'upper', 12.0, 50, arch=small, epochs=1)      # took it as the baseline
    write_run(tmp_path / 'small_up_2ep', 'upper', 15.0, 90, arch=small, epochs=2)  # no 2-epoch baseline
    write_run(tmp_path / 'small_no_w2', 'no', 11.0, 60, arch=small, epochs=1, world_size=2)
    write_run(tmp_path / 'small_up_w2', 'upper', 13.5, 40, arch=small, epochs=1, world_size=2)
    write_run(tmp_path / 'small_up_bf16', 'upper', 9.0, 30, arch=small, epochs=1, precision='bfloat16')
    load_collect().main(['--root', str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    assert head[:3] == ['model', 'setting', 'strategy'] and len(head) == 11
    rows = {(r[0], r[1], r[2]): r[3:] for r in
            ([c.strip() for c in ln.strip('|').split('|')] for ln in lines[2:])}
    assert len(rows) == 8
    label = 'Vim (4 layers, width 32, patch 8)'  # not 'Vim-Ti': only its name is Vim-Ti's
    setting = 'epochs={}, input_size={}, precision={}, world_size={}'.format
    # top-1, top-5, time, memory, Δ top-1, Δ top-5, time vs none, memory vs none
    assert rows[(label, setting(1, 32, 'float32', 1), 'upper (L=1, r=2)')] == \
        ['12.0', '22.0', '0:00:50', '-', '+2.0', '+2.0', '0.50', '-']
    assert rows[(label, setting(1, 32, 'float32', 2), 'upper (L=1, r=2)')] == \
        ['13.5', '23.5', '0:00:40', '-', '+2.5', '+2.5', f'{40 / 60:.2f}', '-']
    assert rows[(label, setting(2, 32, 'float32', 1), 'upper (L=1, r=2)')][4:] == ['-'] * 4
    assert rows[(label, setting(1, 32, 'bfloat16', 1), 'upper (L=1, r=2)')][4:] == ['-'] * 4
    assert rows[('Vim-Ti', setting(1, 224, 'float32', 1), 'upper (L=1, r=2)')][4:7] == ['-1.0', '-1.0', '0.80']


def test_collect_results_skips_summaries_it_cannot_read_and_takes_a_run_as_root(tmp_path, capsys):
    write_summary(tmp_path / 'run', TINY, 'no', 0, 0, 70.1, 90.6, 60, 100)
    for name, text in (('broken', '{"model": '), ('empty', '{}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'summary.json').write_text(text)
    load_collect().main([str(tmp_path / 'broken'), str(tmp_path / 'empty'), str(tmp_path / 'run')])
    captured = capsys.readouterr()
    assert captured.err.count('is not one main.py wrote') == 2 and '| Vim-Ti | none | 70.1 |' in captured.out
    load_collect().main(['--root', str(tmp_path / 'run')])
    assert '| Vim-Ti | none | 70.1 |' in capsys.readouterr().out


def test_model_labels_follow_the_architecture():
    collect = load_collect()
    assert collect.model_label(TINY) == 'Vim-Ti' and collect.model_label(SMALL) == 'Vim-S'
    # older summaries (no 'architecture'): from the args, None meaning the model's own size
    s = {'model': TINY, 'args': {'depth': 4, 'embed_dim': 32, 'patch_size': 8, 'input_size': 32}}
    assert collect.model_label(TINY, collect.architecture(s)) == 'Vim (4 layers, width 32, patch 8)'
    s = {'model': SMALL, 'args': {'depth': None, 'embed_dim': None, 'patch_size': None}}
    assert collect.model_label(SMALL, collect.architecture(s)) == 'Vim-S'
    stride8 = TINY.replace('patch16_', 'patch16_stride8_')
    assert collect.model_label(stride8) == 'Vim-Ti (stride 8)'


def test_kernel_attribution_sums_each_kernel_under_the_op_that_launched_it():
    spec = importlib.util.spec_from_file_location('kernel_attribution', os.path.join(REPO, 'scripts',
                                                                                     'kernel_attribution.py'))
    attribution = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attribution)
    bmm = dict(cat='cpu_op', name='aten::bmm', args={'External id': 7, 'Input Dims': [[2, 8, 12], [2, 12, 4]],
                                                     'Input Strides': [[352, 44, 1], [48, 1, 12]],
                                                     'Input type': ['c10::BFloat16', 'c10::BFloat16']})
    events = [bmm, dict(cat='cpu_op', name='aten::add', args={'External id': 8}),
              dict(cat='cuda_runtime', name='cudaLaunchKernel', args={'External id': 7}),
              dict(cat='cuda_runtime', name='cuLaunchKernelEx', args={'External id': 8}),
              dict(cat='cuda_runtime', name='cudaMemcpyAsync', args={}),
              dict(cat='kernel', name='gemm_a', dur=3.0, args={'External id': 7}),
              dict(cat='kernel', name='gemm_a', dur=4.5, args={'External id': 7}),
              dict(cat='kernel', name='add_k', dur=1.0, args={'External id': 8}),
              dict(cat='kernel', name='orphan', dur=2.0, args={})]
    kernels, launches = attribution.attribute(events)
    assert launches == 2
    key = ('gemm_a', 'aten::bmm', '[[2, 8, 12], [2, 12, 4]]', '[[352, 44, 1], [48, 1, 12]]',
           '["c10::BFloat16", "c10::BFloat16"]')
    assert kernels[key] == [7.5, 2]
    assert kernels[('add_k', 'aten::add', 'null', 'null', 'null')] == [1.0, 1]
    assert kernels[('orphan', '?', 'null', 'null', 'null')] == [2.0, 1]
    assert len(kernels) == 3


def test_host_floor_records_the_backward_and_replays_the_update(one_thread):
    """host_floor's recorder sees the calls below autograd, the backward's and the optimizer's too, and its replay
    makes them again: an SGD step replayed applies the recorded gradient once more."""
    spec = importlib.util.spec_from_file_location('host_floor', os.path.join(REPO, 'scripts', 'host_floor.py'))
    host_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_floor)
    import torch
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, foreach=False)
    w0 = layer.weight.detach().clone()
    recorder = host_floor.StepRecorder(record_launches=False)
    with recorder:
        layer(torch.randn(3, 8)).square().sum().backward()
        optimizer.step()
    names = [call.overloadpacket.__name__ for _, call, _, _ in recorder.calls]
    assert names.count('mm') == 2    # forward, and the weight's gradient in backward (the input needs none)
    kinds = dict(zip(names, (kind for kind, *_ in recorder.calls)))
    assert kinds['t'] == 'meta' and kinds['mm'] == 'compute' and kinds['add_'] == 'compute'
    w1 = layer.weight.detach().clone()
    host_floor.replay(recorder.calls)
    assert torch.allclose(layer.weight.detach() - w1, w1 - w0, rtol=0, atol=1e-6)
    assert not torch.equal(w1, w0)
