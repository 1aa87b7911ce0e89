"""The accuracy-efficiency trade-off of Famba-V runs, drawn beside the paper's Table 1 (scripts/collect_results.py
--plot FILE.png).

Top row: top-1 against training time and against peak memory; one filled, labelled point per run, a colour per
model, and the paper's points of the same model hollow and labelled "paper". Bottom row: each fused run against
the no-fusion run of its setting (top-1 change in points against the ratio of time and of memory), and the paper's
points against the paper's own no-fusion row: this is where runs of any length, on any hardware, compare with the
paper. An axis whose values span more than 20x (a few epochs beside the paper's 300) is logarithmic. Labels go
where they cover no other label and no marker. FILE.json, written beside the PNG, lists every plotted point as read
back from the figure.
"""
import json
import os

try:  # optional: only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
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
# panel name -> (x axis label, y axis label, title)
PANELS = {
    'time': ('training time (h:mm)', 'top-1 accuracy (%)', 'top-1 vs training time'),
    'memory': ('peak memory (MiB)', 'top-1 accuracy (%)', 'top-1 vs peak memory'),
    'time_vs_none': ('training time / that of the no-fusion run', 'top-1 change vs no fusion (points)',
                     'against no fusion: top-1 vs time'),
    'memory_vs_none': ('peak memory / that of the no-fusion run', 'top-1 change vs no fusion (points)',
                       'against no fusion: top-1 vs memory'),
}
LOG_SPAN = 20  # an axis whose largest value is more than this times its smallest is drawn on a log scale
LOG_TICKS = {'time': [m / 60 for m in (1, 2, 5, 10, 20, 60, 120, 240, 480, 960, 1920, 3840)],  # hours
             'memory': [m * 10 ** e for e in range(1, 7) for m in (1, 3)]}  # MiB
# where a label may sit, nearest first, in points from its marker; a negative x ends the text left of the marker
LABEL_OFFSETS = ((4, 3), (4, -10), (-4, 3), (-4, -10), (4, 11), (-4, 11), (4, -18), (-4, -18), (0, 19), (0, -26),
                 (4, 19), (-4, 19), (4, -26), (-4, -26), (0, 27), (0, -34))
MARKER_SIZE = 7  # points


def hours(hms):
    h, m, s = (int(v) for v in hms.split(':'))
    return h + m / 60 + s / 3600


def _h_mm(value, _pos=None):
    minutes = int(round(value * 60))
    return f'{minutes // 60}:{minutes % 60:02d}'


def panel_points(runs, model, panel):
    """(label, x, y) of one model's runs and of its paper rows in one panel: ([runs], [paper]). Points without a
    value (a CPU run has no memory figure, a run without a no-fusion run has no change) are left out; the no-fusion
    rows themselves are the origin (1, 0) of the lower panels, not points of them."""
    rows = PAPER_TABLE1.get(model, [])
    ours = [r for r in runs if r['model'] == model]
    if panel in ('time', 'memory'):
        own = [(r['label'], r['total_time_s'] / 3600 if panel == 'time' else r['max_peak_mem_mib'], r['top1'])
               for r in ours]
        paper = [(s, hours(t) if panel == 'time' else m, a) for s, a, t, m in rows]
    else:
        which = panel[:-len('_vs_none')]
        own = [(r['label'], r['vs_none'][which], r['vs_none']['top1']) for r in ours if r.get('vs_none')]
        paper = []
        if rows:
            _, a0, t0, m0 = rows[0]
            paper = [(s, hours(t) / hours(t0) if which == 'time' else m / m0, round(a - a0, 6))
                     for s, a, t, m in rows[1:]]
    complete = lambda points: [p for p in points if p[1] is not None and p[2] is not None]  # noqa: E731
    return complete(own), complete(paper)


def _log_scale_if_wide(ax, panel, xs):
    if panel not in LOG_TICKS or not xs or min(xs) <= 0 or max(xs) / min(xs) <= LOG_SPAN:
        return
    ax.set_xscale('log')
    ax.set_xlabel(ax.get_xlabel() + ', log scale')
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator([t for t in LOG_TICKS[panel] if low <= t <= high]))
    ax.xaxis.set_major_formatter(FuncFormatter(_h_mm if panel == 'time' else lambda v, _pos: f'{v:.0f}'))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def place_labels(fig, ax, labels, points, rounds=4):
    """Put each label (an offset Annotation) at the first of LABEL_OFFSETS where it stays inside the axes and
    covers no marker at ``points`` (data coordinates) and no other label: one greedy pass in order, then passes
    that move each label that still covers something to where it covers the least."""
    renderer = fig.canvas.get_renderer()
    radius = MARKER_SIZE / 2 * fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in ax.transData.transform(points)]

    def overlap(a, b):
        return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))

    def put(label, offset):
        label.set_position(offset)
        label.set_horizontalalignment('left' if offset[0] > 0 else 'right' if offset[0] < 0 else 'center')
        b = label.get_window_extent(renderer)
        return b.x0, b.y0, b.x1, b.y1

    def cost(box, others):  # pixels of box outside the axes or on the others
        inside = overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
        return (box[2] - box[0]) * (box[3] - box[1]) - inside + sum(overlap(box, o) for o in others)

    boxes = []
    for i in range(rounds + 1):
        for k, label in enumerate(labels):
            others = markers + (boxes[:k] if i == 0 else boxes[:k] + boxes[k + 1:])
            if i and not cost(boxes[k], others):
                continue
            costs = {}
            for offset in LABEL_OFFSETS:
                costs[offset] = cost(put(label, offset), others)
                if not costs[offset]:
                    break
            box = put(label, min(costs, key=costs.get))
            boxes[k:k + 1] = [box]
        if not any(cost(b, markers + boxes[:k] + boxes[k + 1:]) for k, b in enumerate(boxes)):
            break


def draw_tradeoff(runs):
    """The figure and its points, read back from the figure's artists: (Figure, {panel: [{model, source ('run' or
    'paper'), label, x, y}]}), x in hours, MiB or a ratio, y in % or points."""
    models = list(dict.fromkeys(r['model'] for r in runs))
    fig = Figure(figsize=(11, 8.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = dict(zip(PANELS, fig.subplots(2, 2).flat))
    series = {}  # Line2D -> (model, source, the label of each of its points)
    labels = {panel: [] for panel in PANELS}
    for panel, ax in axes.items():
        xlabel, ylabel, title = PANELS[panel]
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if panel.endswith('_vs_none'):
            ax.axhline(0, color='gray', linewidth=0.8, linestyle='--')
            ax.axvline(1, color='gray', linewidth=0.8, linestyle='--')
            ax.plot([1], [0], marker='+', color='black', markersize=MARKER_SIZE + 3, linestyle='none')
            labels[panel].append(ax.annotate('no fusion', (1, 0), xytext=(4, 3), textcoords='offset points',
                                             fontsize=6.5, in_layout=False))
        for colour, model in zip(COLOURS * len(models), models):
            own, paper = panel_points(runs, model, panel)
            for source, points, style in (('run', own, dict(marker='o', color=colour, label=f'{model}: these runs')),
                                          ('paper', paper, dict(marker='s', markerfacecolor='none', color=colour,
                                                                label=f'{model}: paper (Table 1)'))):
                if not points:
                    continue
                (line,) = ax.plot([p[1] for p in points], [p[2] for p in points], linestyle='none',
                                  markersize=MARKER_SIZE, **style)
                series[line] = (model, source, [p[0] for p in points])
                for text, x, y in points:
                    labels[panel].append(ax.annotate(text if source == 'run' else f'paper {text}', (x, y),
                                                     xytext=(4, 3), textcoords='offset points', fontsize=6.5,
                                                     color=colour if source == 'run' else 'gray', in_layout=False))
        ax.margins(0.12)
        _log_scale_if_wide(ax, panel, [x for line in series if line.axes is ax for x in line.get_xdata()])
        if panel == 'time':
            ax.xaxis.set_major_formatter(FuncFormatter(_h_mm))
    # every run has a time, not every one a memory figure: the legend lists the time panel's series
    axes['memory'].legend(*axes['time'].get_legend_handles_labels(), fontsize=7, loc='best')
    fig.tight_layout()
    for panel, ax in axes.items():
        marks = [(x, y) for line in ax.get_lines() if line.get_marker() not in ('None', None, '')
                 for x, y in zip(line.get_xdata(), line.get_ydata())]
        place_labels(fig, ax, labels[panel], marks)
    plotted = {panel: [{'model': model, 'source': source, 'label': text, 'x': float(x), 'y': float(y)}
                       for line in ax.get_lines() if line in series for (model, source, texts) in [series[line]]
                       for text, x, y in zip(texts, line.get_xdata(), line.get_ydata())]
               for panel, ax in axes.items()}
    return fig, plotted


def plot_tradeoff(runs, output_path):
    """runs: dicts with model (label, e.g. 'Vim-Ti'), label (the run's fusion setting), top1 (%), total_time_s,
    max_peak_mem_mib (None: not measured, e.g. a CPU run; such a point is left out of the memory panels) and
    vs_none (the change against the no-fusion run of the run's setting: {'top1' in points, 'time', 'memory' as
    ratios}; None for a no-fusion run or one without such a run, which the lower panels leave out). Writes the PNG
    and, beside it, a JSON of the plotted points (see draw_tradeoff). Returns that dict."""
    if Figure is None:
        raise ImportError('the trade-off plot needs matplotlib (pip install matplotlib, see vim_requirements.txt)')
    fig, plotted = draw_tradeoff(runs)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    fig.canvas.print_png(output_path)
    with open(os.path.splitext(output_path)[0] + '.json', 'w') as f:
        json.dump(plotted, f, indent=1)
    return plotted
