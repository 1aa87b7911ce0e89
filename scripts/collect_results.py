"""Turn run folders (each with the summary.json that main.py writes) into a markdown table laid out
like the paper's Table 1: model, strategy, top-1, top-5, training time, peak memory, and the change
against the no-fusion run of the same setting (accuracy in points, time and memory as ratios).

A run's baseline is the no-fusion run that matches it in everything but the fusion flags: model name and
architecture (depth, width, patch size, stride), input size, data set, epochs, batch size, world size,
precision, device and every other training flag in summary.json's args (paths, worker counts and the like
aside). Runs without such a run show '-' in the comparison columns. Models are labelled by their
architecture ('Vim-Ti' only for a 24-layer, 192-wide, patch-16 Vim); when the runs differ in other
settings, a 'setting' column names the settings that tell them apart.

    python scripts/collect_results.py output/table1/*            # or: --root output/table1
"""
import argparse
import glob
import json
import os
import sys

MODEL_NAMES = (('vim_tiny', 'Vim-Ti'), ('vim_small', 'Vim-S'), ('vim_base', 'Vim-B'))
MODEL_WIDTHS = {'vim_tiny': 192, 'vim_small': 384, 'vim_base': 768}  # all: 24 layers, 16 px patches
ARCH_FIELDS = ('depth', 'embed_dim', 'patch_size', 'stride', 'input_size')
# args that do not change what a run measures, and those compared through the architecture or the summary
IGNORED_ARGS = {'fusion_strategy', 'fusion_layer', 'fusion_token', 'fusion_order', 'fusion_mode',
                'output_dir', 'data_path', 'resume', 'start_epoch', 'eval', 'print_freq', 'num_workers', 'pin_mem',
                'dist_url', 'local_rank', 'rank', 'gpu', 'distributed', 'dist_backend', 'world_size',
                'depth', 'embed_dim', 'patch_size', 'input_size'}
STRATEGY_ORDER = ('no', 'all', 'interleaved', 'lower', 'upper')
ALIASES = {'none': 'no', 'alternate': 'interleaved'}


def model_rank(name):
    return next((i for i, (prefix, _) in enumerate(MODEL_NAMES) if name.startswith(prefix)), len(MODEL_NAMES))


def _prefix(name):
    return next((prefix for prefix, _ in MODEL_NAMES if name.startswith(prefix)), None)


def architecture(summary):
    """depth, embed_dim, patch_size, stride, input_size of a run: as main.py records them, else (older
    summaries) from its args and its model name's defaults; None where unknown."""
    if summary.get('architecture'):
        return {k: summary['architecture'].get(k) for k in ARCH_FIELDS}
    args, name = summary.get('args', {}), summary['model']
    prefix = _prefix(name)
    patch = args.get('patch_size') or (16 if prefix else None)
    return {'depth': args.get('depth') or (24 if prefix else None),
            'embed_dim': args.get('embed_dim') or MODEL_WIDTHS.get(prefix),
            'patch_size': patch,
            'stride': 8 if '_stride8_' in name else patch,
            'input_size': args.get('input_size', 224 if prefix else None)}


def model_label(name, arch=None):
    """'Vim-Ti' for a model with Vim-Ti's architecture (24 layers, width 192, patch 16); others spelled out."""
    prefix = _prefix(name)
    if prefix is None:
        return name
    a = arch or architecture({'model': name})
    depth, width, patch, stride = (a.get(k) for k in ('depth', 'embed_dim', 'patch_size', 'stride'))
    if (depth, width, patch) == (24, MODEL_WIDTHS[prefix], 16) and stride in (8, 16):
        return dict(MODEL_NAMES)[prefix] + (' (stride 8)' if stride == 8 else '')
    return (f'Vim ({depth} layers, width {width}, patch {patch}'
            + (f', stride {stride}' if stride != patch else '') + ')')


def setting(summary):
    """Everything a no-fusion baseline must share with a run: {name: value}."""
    key = {'model': summary['model'], **architecture(summary)}
    for k in ('epochs', 'world_size', 'precision', 'device'):
        key[k] = summary.get(k)
    for k, v in summary.get('args', {}).items():
        if k not in IGNORED_ARGS:
            key.setdefault(k, v)
    return key


def _key(setting_dict):
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in setting_dict.items()))


def hms(seconds):
    s = int(round(seconds))
    return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def load_runs(folders):
    runs = []
    for folder in folders:
        path = os.path.join(folder, 'summary.json')
        if not os.path.isfile(path):
            print(f'skipping {folder}: no summary.json (run not finished?)', file=sys.stderr)
            continue
        try:
            with open(path) as f:
                s = json.load(f)
            args = s['args']
            strategy = ALIASES.get(args['fusion_strategy'], args['fusion_strategy'])
        except (ValueError, KeyError, TypeError) as e:
            print(f'skipping {folder}: its summary.json is not one main.py wrote ({type(e).__name__}: {e})',
                  file=sys.stderr)
            continue
        runs.append({'folder': folder, 'model': s['model'], 'strategy': strategy,
                     'layer': args['fusion_layer'], 'token': args['fusion_token'], 'summary': s,
                     'arch': architecture(s), 'setting': setting(s)})
    return runs


def strategy_label(run):
    if run['strategy'] == 'no':
        return 'none'
    if run['strategy'] in ('lower', 'upper'):
        return f"{run['strategy']} (L={run['layer']}, r={run['token']})"
    return f"{run['strategy']} (r={run['token']})"


def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or not b else a / b


def compare_with_baselines(runs, metric='best'):
    """Sort the runs as the table lists them and give each, as run['vs_none'], its change against the no-fusion
    run of its setting: {'top1', 'top5' (points), 'time', 'memory' (ratios)}, each None where unknown; None
    for a run without such a run. Returns the sorted list."""
    key1, key5 = f'{metric}_acc1', f'{metric}_acc5'
    for r in runs:
        r.setdefault('arch', architecture(r['summary']))
        r.setdefault('setting', setting(r['summary']))
    runs = sorted(runs, key=lambda r: (model_rank(r['model']), r['model'], _key(r['setting']),
                                       STRATEGY_ORDER.index(r['strategy']), r['layer'], r['token']))
    baseline = {}
    for r in runs:
        if r['strategy'] == 'no':
            key = _key(r['setting'])
            if key in baseline:
                print(f"{r['folder']}: another no-fusion run of the same setting; comparing with "
                      f"{baseline[key]['folder']}", file=sys.stderr)
            baseline.setdefault(key, r)
    for r in runs:
        s, base = r['summary'], baseline.get(_key(r['setting']))
        base = base and base['summary']
        r['vs_none'] = base and {
            'top1': None if s[key1] is None or base[key1] is None else s[key1] - base[key1],
            'top5': None if s[key5] is None or base[key5] is None else s[key5] - base[key5],
            'time': ratio(s['total_time_s'], base['total_time_s']),
            'memory': ratio(s.get('max_peak_mem_mib'), base.get('max_peak_mem_mib'))}
    return runs


def make_table(runs, metric='best'):
    """Markdown table of runs as compare_with_baselines returns them; ``metric`` picks best (the epoch of the
    highest top-1) or final (last epoch) accuracy."""
    key1, key5 = f'{metric}_acc1', f'{metric}_acc5'
    # the settings (beyond those in the model label) in which the runs differ get a column of their own
    shown = set(ARCH_FIELDS[:4]) | {'model'}
    varying = sorted(k for k in set().union(*(r['setting'] for r in runs)) - shown
                     if len({json.dumps(r['setting'].get(k), sort_keys=True) for r in runs}) > 1)
    head = ['model'] + (['setting'] if varying else []) + ['strategy', 'top-1', 'top-5', 'training time',
                                                            'peak memory (MiB)', 'Δ top-1', 'Δ top-5',
                                                            'time vs none', 'memory vs none']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for r in runs:
        s, vs = r['summary'], r['vs_none'] or {}
        label = model_label(r['model'], r['arch'])
        if varying:
            label += ' | ' + ', '.join(f"{k}={r['setting'].get(k)}" for k in varying)
        lines.append(f"| {label} | {strategy_label(r)} | {fmt(s[key1], '.1f')} | "
                     f"{fmt(s[key5], '.1f')} | {hms(s['total_time_s'])} | {fmt(s.get('max_peak_mem_mib'), '.0f')} | "
                     f"{fmt(vs.get('top1'), '+.1f')} | {fmt(vs.get('top5'), '+.1f')} | {fmt(vs.get('time'), '.2f')} | "
                     f"{fmt(vs.get('memory'), '.2f')} |")
    return '\n'.join(lines)


def tradeoff_runs(runs, metric='best'):
    """What scripts/tradeoff_plot.py draws of runs as compare_with_baselines returns them."""
    return [{'model': model_label(r['model'], r['arch']), 'label': strategy_label(r),
             'top1': r['summary'][f'{metric}_acc1'], 'total_time_s': r['summary']['total_time_s'],
             'max_peak_mem_mib': r['summary'].get('max_peak_mem_mib'),
             'vs_none': r['vs_none'] if r['strategy'] != 'no' else None} for r in runs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='*', help='run folders holding summary.json')
    parser.add_argument('--root', help='use every sub-folder of ROOT that holds a summary.json')
    parser.add_argument('--metric', choices=['best', 'final'], default='best',
                        help='best: the epoch of the highest top-1 (DeiT "Max accuracy"), with its top-5; '
                             'final: the last epoch')
    parser.add_argument('--plot', metavar='FILE.png', help='also draw the accuracy-efficiency trade-off '
                        '(scripts/tradeoff_plot.py; FILE.json beside it lists the plotted points)')
    args = parser.parse_args(argv)
    folders = list(args.folders)
    if args.root:  # the runs below ROOT, or ROOT itself when it is a run
        folders += sorted(os.path.dirname(p) for p in glob.glob(os.path.join(args.root, '*', 'summary.json'))) or [
            args.root]
    runs = load_runs(folders)
    if not runs:
        parser.error('no summary.json found in the given folders')
    runs = compare_with_baselines(runs, args.metric)
    print(make_table(runs, args.metric))
    if args.plot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tradeoff_plot
        try:
            tradeoff_plot.plot_tradeoff(tradeoff_runs(runs, args.metric), args.plot)
        except ImportError as e:
            parser.error(str(e))


if __name__ == '__main__':
    main()
