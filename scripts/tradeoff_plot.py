"""The accuracy-efficiency trade-off of Famba-V runs, drawn beside the paper's Table 1 (scripts/collect_results.py
--plot FILE.png). Panel 1: top-1 against training time; panel 2: top-1 against peak memory. One filled, labelled
point per run, a colour per model; the paper's points of the same model hollow and labelled "paper". FILE.json,
written beside the PNG, lists every plotted point as read back from the figure.
"""
import json
import os

try:  # optional: only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
except ImportError:
    Figure = None

# Paper Table 1 (CIFAR-100, 224 px, 300 epochs, 4 x A100, fp32): strategy, top-1 (%), training time, peak memory (MiB)
PAPER_TABLE1 = {
    'Vim-Ti': [('none', 70.1, '4:33:02', 8302), ('all', 61.9, '4:06:45', 5499), ('interleaved', 67.0, '3:59:21', 5354),
               ('lower', 62.2, '3:55:56', 4741), ('upper', 70.5, '4:08:40', 5996)],
    'Vim-S': [('none', 76.9, '7:46:16', 16439), ('all', 68.9, '6:01:16', 10657),
              ('interleaved', 72.8, '5:56:15', 10400), ('lower', 69.0, '5:34:36', 9139),
              ('upper', 75.2, '6:19:28', 12161)],
}
COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')
PANELS = (('time', 'training time (h:mm)'), ('memory', 'peak memory (MiB)'))


def hours(hms):
    h, m, s = (int(v) for v in hms.split(':'))
    return h + m / 60 + s / 3600


def _h_mm(value, _pos=None):
    minutes = int(round(value * 60))
    return f'{minutes // 60}:{minutes % 60:02d}'


def plot_tradeoff(runs, output_path):
    """runs: dicts with model (label, e.g. 'Vim-Ti'), label (the run's fusion setting), top1 (%), total_time_s and
    max_peak_mem_mib (None: not measured, e.g. a CPU run; such a point is left out of the memory panel). Writes the
    PNG and, beside it, a JSON of the plotted points: {panel: [{model, source ('run' or 'paper'), label, x, y}]}
    with x in hours (time) or MiB (memory) and y in %. Returns that dict."""
    if Figure is None:
        raise ImportError('the trade-off plot needs matplotlib (pip install matplotlib, see vim_requirements.txt)')
    models = list(dict.fromkeys(r['model'] for r in runs))
    fig = Figure(figsize=(11, 4.6), dpi=110)
    axes = fig.subplots(1, 2)
    labels = {}  # Line2D -> the label of each of its points
    for ax, (panel, xlabel) in zip(axes, PANELS):
        for colour, model in zip(COLOURS * len(models), models):
            ours = [(r['label'], r['total_time_s'] / 3600 if panel == 'time' else r['max_peak_mem_mib'], r['top1'])
                    for r in runs if r['model'] == model]
            ours = [p for p in ours if p[1] is not None and p[2] is not None]
            paper = [(s, hours(t) if panel == 'time' else m, a) for s, a, t, m in PAPER_TABLE1.get(model, [])]
            for source, points, style in (('run', ours, dict(marker='o', color=colour, label=f'{model}: these runs')),
                                          ('paper', paper, dict(marker='s', markerfacecolor='none', color=colour,
                                                                label=f'{model}: paper (Table 1)'))):
                if not points:
                    continue
                (line,) = ax.plot([p[1] for p in points], [p[2] for p in points], linestyle='none', markersize=7,
                                  **style)
                labels[line] = (model, source, [p[0] for p in points])
                for text, x, y in points:
                    ax.annotate(text if source == 'run' else f'paper {text}', (x, y), xytext=(4, 3),
                                textcoords='offset points', fontsize=6.5, color=colour if source == 'run' else 'gray')
        ax.set_xlabel(xlabel)
        ax.set_ylabel('top-1 accuracy (%)')
        ax.grid(alpha=0.3)
        if panel == 'time':
            ax.xaxis.set_major_formatter(FuncFormatter(_h_mm))
    axes[0].set_title('top-1 vs training time', fontsize=10)
    axes[1].set_title('top-1 vs peak memory', fontsize=10)
    axes[1].legend(fontsize=7, loc='best')
    fig.tight_layout()
    plotted = {}
    for ax, (panel, _) in zip(axes, PANELS):  # read back from the artists: what the picture shows
        plotted[panel] = [{'model': model, 'source': source, 'label': text, 'x': float(x), 'y': float(y)}
                          for line in ax.get_lines() for (model, source, texts) in [labels[line]]
                          for text, x, y in zip(texts, line.get_xdata(), line.get_ydata())]
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(output_path)
    with open(os.path.splitext(output_path)[0] + '.json', 'w') as f:
        json.dump(plotted, f, indent=1)
    return plotted
