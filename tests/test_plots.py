"""The pictures: scripts/visualize_fusion.py (patches held by each token) and the trade-off plot of
scripts/collect_results.py --plot (scripts/tradeoff_plot.py)."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_helpers import QUIET, REPO, TINY_MODEL, write_cifar100
from test_scripts import SMALL, TINY, load_collect, write_summary
from test_token_fusion import held

pytestmark = pytest.mark.usefixtures('one_thread')


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- visualize_fusion.py

def test_visualize_fusion_draws_each_patch_in_the_colour_of_its_token(tmp_path):
    """Tiny random Vim (16 patches of 8 px + a head class token; 3 tokens fused in each of 4 layers: 14, 11, 8, 5
    tokens) on three CIFAR-format images. The PNG is 5 columns of 212 px by a 46 px header and 3 rows of 246 px;
    in each layer's cell a single-patch token shows the image's own pixels and a merged one the 45/55 blend with
    its colour, and the strip below shows the tokens in order, the class token (first in order "released") black."""
    write_cifar100(tmp_path / 'cifar-100-python', n_train=4, n_test=3)
    out = tmp_path / 'grid.png'
    vf = load_script('visualize_fusion')
    args = vf.get_args_parser().parse_args(
        [str(a) for a in TINY_MODEL + QUIET] + ['--data-set', 'CIFAR', '--data-path', str(tmp_path),
                                                '--fusion-strategy', 'all', '--fusion-token', '3', '--images', '3',
                                                '--output', str(out)])
    vf.run(args)
    png = np.asarray(Image.open(out)).astype(float)
    assert png.shape == (46 + 3 * 246, 5 * 212, 3)

    model, origin = vf.build(args)  # the same seed: the same random model, to know its groups
    assert origin.startswith('RANDOM INIT')
    images, _ = vf.load_images(args, 3)
    sources = []
    with torch.no_grad():
        model(images, sources)
    with open(tmp_path / 'cifar-100-python' / 'test', 'rb') as f:
        pixels = pickle.load(f, encoding='latin1')['data'].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1) / 255
    step = 200 / 32  # display pixels per image pixel
    for row in range(3):
        top = 46 + row * 246 + 22
        for col, layer in enumerate(range(4), start=1):
            left = col * 212 + 6
            groups = held(sources[layer][row], model.tokens_per_layer[layer])
            patch_groups = {p: g for g in groups for p in g}  # embedded position -> its token's group
            for p in range(16):
                gy, gx = divmod(p, 4)
                y, x = gy * 8 + 5, gx * 8 + 5  # inside the patch, clear of outlines and the class marker
                want = pixels[row, y, x]
                group = patch_groups[p + 1]  # position 0 is the class token
                if len(group) > 1:
                    want = 0.45 * want + 0.55 * vf.group_colour(min(group) - 1)
                got = png[int(top + (y + 0.5) * step), int(left + (x + 0.5) * step)] / 255
                assert np.abs(got - want).max() < 3 / 255, (row, layer, p)
            width = 200 / len(groups)
            for j, group in enumerate(groups):
                got = png[top + 200 + 2 + 5, int(left + (j + 0.5) * width)] / 255
                if j == 0:
                    assert group == [0] and got.max() < 3 / 255
                elif len(group) > 1:
                    assert np.abs(got - vf.group_colour(min(group) - 1)).max() < 3 / 255
                else:
                    assert np.abs(got - (0.92 - 0.62 * (group[0] - 1) / 15)).max() < 3 / 255
        # the input column shows the image itself and has no strip
        got = png[int(top + 16.5 * step), int(6 + 20.5 * step)] / 255
        assert np.abs(got - pixels[row, 16, 20]).max() < 3 / 255
        assert (png[top + 200 + 2:top + 200 + 12, 6:206] == 255).all()


def test_visualize_fusion_errors_are_one_line(tmp_path):
    script = os.path.join(REPO, 'scripts', 'visualize_fusion.py')
    base = [str(a) for a in TINY_MODEL + QUIET] + ['--output', str(tmp_path / 'x.png'), '--image-dir', str(tmp_path)]
    no_matplotlib = ('import runpy, sys; sys.modules["matplotlib"] = None; '
                     f'sys.argv = {["visualize_fusion.py"] + base!r}; runpy.run_path({script!r}, run_name="__main__")')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for cmd, message in (
            ([sys.executable, '-c', no_matplotlib], 'matplotlib is needed'),
            ([sys.executable, script] + base + ['--fusion-strategy', 'upper', '--fusion-layer', '1',
                                                '--fusion-token', '2', '--layers', '1', '3'],
             'not all are fused layers; these fuse: 2 3'),
            ([sys.executable, script] + base + ['--fusion-strategy', 'all', '--fusion-token', '2'],
             'no image files')):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith('visualize_fusion.py: error: ') and message in proc.stderr, proc.stderr
    assert not (tmp_path / 'x.png').exists()


def test_visualize_fusion_says_when_the_checkpoint_was_trained_with_other_settings(tmp_path, capsys):
    vf = load_script('visualize_fusion')
    flags = [str(a) for a in TINY_MODEL + QUIET] + ['--output', 'unused.png', '--fusion-strategy', 'upper',
                                                   '--fusion-layer', '1']
    trained = vf.get_args_parser().parse_args(flags + ['--fusion-token', '2'])
    model = vf.main.build_model(trained, 10)
    torch.save({'model': model.state_dict(), 'args': vars(trained)}, tmp_path / 'ckpt.pth')
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    _, origin = vf.build(vf.get_args_parser().parse_args(flags + ['--fusion-token', '2', '--resume',
                                                                  str(tmp_path / 'ckpt.pth')]))
    assert 'other settings' not in origin and 'warning' not in capsys.readouterr().err
    _, origin = vf.build(vf.get_args_parser().parse_args(flags + ['--fusion-token', '3', '--resume',
                                                                  str(tmp_path / 'ckpt.pth')]))
    assert origin.endswith('(trained with other settings: --fusion-token 3 (checkpoint: 2))')
    assert 'warning: model settings differ' in capsys.readouterr().err
    with pytest.raises(vf.VisualizeError, match='cannot be read as a checkpoint'):
        vf.build(vf.get_args_parser().parse_args(flags + ['--resume', str(tmp_path / 'junk.pth')]))
    with pytest.raises(vf.VisualizeError, match=r'does not fit the model: size mismatch \(\d+\): cls_token'):
        vf.build(vf.get_args_parser().parse_args(flags + ['--embed-dim', '48', '--resume', str(tmp_path / 'ckpt.pth')]))


def test_visualize_fusion_default_layers_spread_over_the_fused_ones():
    vf = load_script('visualize_fusion')
    assert vf.default_layers(list(range(5, 24))) == [5, 11, 17, 23]  # upper L4: 19 fused layers, every 6th
    assert vf.default_layers(list(range(1, 24, 2))) == [1, 9, 15, 23]  # interleaved: positions 0, 3.67, 7.33, 11
    assert vf.default_layers([2, 3]) == [2, 3]


# ----------------------------------------------------------------------------- trade-off plot

def test_tradeoff_plot_points_are_the_summaries_and_the_papers(tmp_path, capsys):
    """collect_results --plot: every run is one point per panel at (hours or MiB, top-1) straight from its
    summary.json (a run without a memory figure only in the time panel), and each model of the paper's Table 1
    gets its five hollow points; the JSON beside the PNG is read back from the figure's lines."""
    write_summary(tmp_path / 'a', TINY, 'no', 0, 0, 52.25, 80.0, 5400, 3000.5)
    write_summary(tmp_path / 'b', TINY, 'upper', 4, 8, 50.5, 79.0, 4000, 2100.0)
    write_summary(tmp_path / 'c', SMALL, 'lower', 19, 9, 44.0, 70.0, 7200, None)
    png = tmp_path / 'plot' / 'tradeoff.png'
    load_collect().main(['--root', str(tmp_path), '--plot', str(png)])
    capsys.readouterr()
    assert Image.open(png).size[0] > 0
    with open(tmp_path / 'plot' / 'tradeoff.json') as f:
        plotted = json.load(f)
    runs = lambda panel: sorted((p['model'], p['label'], p['x'], p['y'])  # noqa: E731
                                for p in plotted[panel] if p['source'] == 'run')
    assert runs('time') == [('Vim-S', 'lower (L=19, r=9)', 2.0, 44.0), ('Vim-Ti', 'none', 1.5, 52.25),
                            ('Vim-Ti', 'upper (L=4, r=8)', 4000 / 3600, 50.5)]
    assert runs('memory') == [('Vim-Ti', 'none', 3000.5, 52.25), ('Vim-Ti', 'upper (L=4, r=8)', 2100.0, 50.5)]
    paper = {(p['model'], p['label']): (p['x'], p['y']) for p in plotted['time'] if p['source'] == 'paper'}
    assert len(paper) == 10
    assert paper[('Vim-Ti', 'upper')] == pytest.approx((4 + 8 / 60 + 40 / 3600, 70.5))
    assert paper[('Vim-S', 'none')] == pytest.approx((7 + 46 / 60 + 16 / 3600, 76.9))
    paper_mem = {(p['model'], p['label']): (p['x'], p['y']) for p in plotted['memory'] if p['source'] == 'paper'}
    assert paper_mem[('Vim-Ti', 'lower')] == (4741, 62.2) and paper_mem[('Vim-S', 'interleaved')] == (10400, 72.8)
    # the lower panels: fused runs against their no-fusion run (Vim-S lower has none), the paper against its own
    assert runs('time_vs_none') == [('Vim-Ti', 'upper (L=4, r=8)', pytest.approx(4000 / 5400), -1.75)]
    assert runs('memory_vs_none') == [('Vim-Ti', 'upper (L=4, r=8)', pytest.approx(2100.0 / 3000.5), -1.75)]
    paper_rel = {(p['model'], p['label']): (p['x'], p['y']) for p in plotted['time_vs_none'] if p['source'] == 'paper'}
    assert sorted(paper_rel) == sorted((m, s) for m in ('Vim-Ti', 'Vim-S') for s in ('all', 'interleaved', 'lower',
                                                                                      'upper'))
    assert paper_rel[('Vim-Ti', 'upper')] == pytest.approx((14920 / 16382, 0.4))  # 4:08:40 / 4:33:02
    assert paper_rel[('Vim-S', 'lower')] == pytest.approx((20076 / 27976, -7.9))  # 5:34:36 / 7:46:16
    paper_rel_mem = {(p['model'], p['label']): (p['x'], p['y'])
                     for p in plotted['memory_vs_none'] if p['source'] == 'paper'}
    assert paper_rel_mem[('Vim-S', 'all')] == pytest.approx((10657 / 16439, -8.0))


def tradeoff_figure(folder):
    """(Figure, points) that collect_results --plot draws of the runs below folder."""
    collect = load_collect()
    runs = collect.compare_with_baselines(collect.load_runs(sorted(str(p) for p in folder.iterdir())))
    return load_script('tradeoff_plot').draw_tradeoff(collect.tradeoff_runs(runs))


def test_tradeoff_plot_labels_cover_no_other_label_and_no_marker(tmp_path):
    """Ten runs of two models beside the paper's twenty points: every label lies inside its panel and overlaps
    neither another label nor any marker (what the placement exists for: with every label at the same offset,
    'paper lower' and 'paper all' of Vim-Ti collide)."""
    paper = load_script('tradeoff_plot').PAPER_TABLE1
    for model, name in ((TINY, 'Vim-Ti'), (SMALL, 'Vim-S')):
        for strategy, acc1, hms, mem in paper[name]:
            h, m, s = (int(v) for v in hms.split(':'))
            write_summary(tmp_path / f'{name}_{strategy}', model, 'no' if strategy == 'none' else strategy,
                          4, 9, acc1 - 1.5, 90.0, (h * 3600 + m * 60 + s) * 0.8, mem * 0.95)
    fig, _ = tradeoff_figure(tmp_path)
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        labels = [t.get_window_extent(renderer) for t in ax.texts]
        markers = [(x, y) for line in ax.get_lines() if line.get_marker() not in ('None', '')
                   for x, y in ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))]
        assert len(labels) >= 10
        for i, box in enumerate(labels):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert not any(box.overlaps(other) for other in labels[i + 1:]), ax.get_title()
            r = 3.5 * px  # the markers' radius: 7 points across
            assert not any(box.x0 < x + r and x - r < box.x1 and box.y0 < y + r and y - r < box.y1
                           for x, y in markers), ax.get_title()


def test_tradeoff_plot_time_axis_is_logarithmic_only_beside_runs_far_shorter_than_the_papers(tmp_path):
    """3-minute runs beside the paper's 4-hour ones would sit in one corner of a linear axis: the time panel turns
    logarithmic (ticks at whole minutes and hours); runs of the paper's length keep it linear."""
    write_summary(tmp_path / 'short' / 'a', TINY, 'no', 0, 0, 33.3, 85.2, 190, 5629)
    write_summary(tmp_path / 'short' / 'b', TINY, 'upper', 4, 8, 37.0, 88.2, 144, 3489)
    fig, _ = tradeoff_figure(tmp_path / 'short')
    time_ax, memory_ax = fig.axes[:2]
    assert time_ax.get_xscale() == 'log' and memory_ax.get_xscale() == 'linear'
    assert [t.get_text() for t in time_ax.get_xticklabels()][:3] == ['0:02', '0:05', '0:10']
    write_summary(tmp_path / 'long' / 'a', TINY, 'no', 0, 0, 70.0, 90.0, 4 * 3600, 8000)
    fig, _ = tradeoff_figure(tmp_path / 'long')
    assert fig.axes[0].get_xscale() == 'linear'


def test_tradeoff_plot_labels_a_smaller_model_by_its_architecture_and_gives_it_no_paper_points(tmp_path, capsys):
    write_summary(tmp_path / 'a', TINY, 'no', 0, 0, 52.0, 80.0, 5400, 3000.0)
    with open(tmp_path / 'a' / 'summary.json') as f:
        summary = json.load(f)
    summary['architecture'] = {'depth': 4, 'embed_dim': 32, 'patch_size': 8, 'stride': 8, 'input_size': 32}
    with open(tmp_path / 'a' / 'summary.json', 'w') as f:
        json.dump(summary, f)
    png = tmp_path / 'tradeoff.png'
    load_collect().main(['--root', str(tmp_path), '--plot', str(png)])
    capsys.readouterr()
    with open(tmp_path / 'tradeoff.json') as f:
        plotted = json.load(f)['time']
    assert [p['model'] for p in plotted if p['source'] == 'run'] == ['Vim (4 layers, width 32, patch 8)']
    assert not [p for p in plotted if p['source'] == 'paper' and p['model'] == 'Vim-Ti']


def test_tradeoff_plot_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch, capsys):
    write_summary(tmp_path / 'a', TINY, 'no', 0, 0, 52.0, 80.0, 5400, 3000.0)
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    try:
        import tradeoff_plot
    finally:
        sys.path.remove(os.path.join(REPO, 'scripts'))
    monkeypatch.setattr(tradeoff_plot, 'Figure', None)
    with pytest.raises(SystemExit):
        load_collect().main(['--root', str(tmp_path), '--plot', str(tmp_path / 'p.png')])
    assert 'error: the trade-off plot needs matplotlib' in capsys.readouterr().err
    assert not (tmp_path / 'p.png').exists()

