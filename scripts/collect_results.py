"""Turn run folders (each with the summary.json that main.py writes) into a markdown table laid out
like the paper's Table 1: model, strategy, top-1, top-5, training time, peak memory, and the change
against the no-fusion run of the same model (accuracy in points, time and memory as ratios).

    python scripts/collect_results.py output/table1/*            # or: --root output/table1
"""
import argparse
import glob
import json
import os
import sys

MODEL_NAMES = (('vim_tiny', 'Vim-Ti'), ('vim_small', 'Vim-S'), ('vim_base', 'Vim-B'))
STRATEGY_ORDER = ('no', 'all', 'interleaved', 'lower', 'upper')
ALIASES = {'none': 'no', 'alternate': 'interleaved'}


def model_rank(name):
    return next((i for i, (prefix, _) in enumerate(MODEL_NAMES) if name.startswith(prefix)), len(MODEL_NAMES))


def model_label(name):
    for prefix, label in MODEL_NAMES:
        if name.startswith(prefix):
            return label + (' (stride 8)' if '_stride8_' in name else '')
    return name


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
        with open(path) as f:
            s = json.load(f)
        args = s['args']
        strategy = ALIASES.get(args['fusion_strategy'], args['fusion_strategy'])
        runs.append({'folder': folder, 'model': s['model'], 'strategy': strategy,
                     'layer': args['fusion_layer'], 'token': args['fusion_token'], 'summary': s})
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


def make_table(runs, metric='best'):
    """Markdown table; ``metric`` picks best (max over epochs) or final (last epoch) accuracy."""
    key1, key5 = f'{metric}_acc1', f'{metric}_acc5'
    runs = sorted(runs, key=lambda r: (model_rank(r['model']), r['model'], STRATEGY_ORDER.index(r['strategy']),
                                       r['layer'], r['token']))
    baseline = {}
    for r in runs:
        if r['strategy'] == 'no':
            baseline.setdefault(r['model'], r['summary'])
    lines = ['| model | strategy | top-1 | top-5 | training time | peak memory (MiB) | '
             'Δ top-1 | Δ top-5 | time vs none | memory vs none |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in runs:
        s, base = r['summary'], baseline.get(r['model'])
        d1 = d5 = t_ratio = m_ratio = None
        if base is not None:
            d1 = None if s[key1] is None or base[key1] is None else s[key1] - base[key1]
            d5 = None if s[key5] is None or base[key5] is None else s[key5] - base[key5]
            t_ratio = ratio(s['total_time_s'], base['total_time_s'])
            m_ratio = ratio(s.get('max_peak_mem_mib'), base.get('max_peak_mem_mib'))
        lines.append(f"| {model_label(r['model'])} | {strategy_label(r)} | {fmt(s[key1], '.1f')} | "
                     f"{fmt(s[key5], '.1f')} | {hms(s['total_time_s'])} | {fmt(s.get('max_peak_mem_mib'), '.0f')} | "
                     f"{fmt(d1, '+.1f')} | {fmt(d5, '+.1f')} | {fmt(t_ratio, '.2f')} | {fmt(m_ratio, '.2f')} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='*', help='run folders holding summary.json')
    parser.add_argument('--root', help='use every sub-folder of ROOT that holds a summary.json')
    parser.add_argument('--metric', choices=['best', 'final'], default='best',
                        help='best: highest top-1/top-5 over the epochs (DeiT "Max accuracy"); final: last epoch')
    parser.add_argument('--plot', metavar='FILE.png', help='also draw the accuracy-efficiency trade-off '
                        '(scripts/tradeoff_plot.py; FILE.json beside it lists the plotted points)')
    args = parser.parse_args(argv)
    folders = list(args.folders)
    if args.root:
        folders += sorted(os.path.dirname(p) for p in glob.glob(os.path.join(args.root, '*', 'summary.json')))
    runs = load_runs(folders)
    if not runs:
        parser.error('no summary.json found in the given folders')
    print(make_table(runs, args.metric))
    if args.plot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tradeoff_plot
        try:
            tradeoff_plot.plot_tradeoff([{'model': model_label(r['model']), 'label': strategy_label(r),
                                          'top1': r['summary'][f'{args.metric}_acc1'],
                                          'total_time_s': r['summary']['total_time_s'],
                                          'max_peak_mem_mib': r['summary'].get('max_peak_mem_mib')} for r in runs],
                                        args.plot)
        except ImportError as e:
            parser.error(str(e))


if __name__ == '__main__':
    main()
