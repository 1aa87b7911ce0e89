"""Pictures of Famba-V's token fusion: which image patches each token holds after chosen fused layers.

    python scripts/visualize_fusion.py --resume output/run/checkpoint.pth --fusion-strategy upper --fusion-layer 4 \
        --fusion-token 9 --data-set CIFAR --data-path ./datasets/cifar-100-python --images 4 --output fusion.png

Model and fusion flags are main.py's; without --resume the model is freshly initialised, and the picture says so.
Images are evenly spaced over the evaluation split of --data-set/--data-path (evaluation transform), or the files
of --image-dir. Rows are images; columns the input, then the chosen fused layers (--layers; default: up to four
spread over the fused ones). In a layer's cell every token that holds two or more patches tints and outlines them
in one colour; single-patch tokens show the plain image. The strip under it is the token sequence entering that
layer's mixer, left to right: single-patch tokens in grey, light to dark in raster order (one ramp in order
"spatial"; in "released" the unfused A tokens first, then all B tokens, among them the merged ones), merged tokens
in their colour, the class token black. The class token holds no patch: a triangle marks where it sits among them.
"""
import argparse
import colorsys
import os
import sys

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

try:  # optional: only this script draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
# Layout in pixels (the PNG is exactly this big: no tight bounding box): per row a title line, the image, the
# sequence strip and a gap; a header (model, fusion, weights, key) on top.
DPI = 100
CELL, PAD, TITLE, STRIP, GAP, HEADER = 200, 6, 22, 14, 10, 46
ROW = TITLE + CELL + STRIP + GAP


def grid_size(rows, cols):
    """(width, height) in pixels of the PNG for ``rows`` images and ``cols`` columns."""
    return cols * (CELL + 2 * PAD), HEADER + rows * ROW


class VisualizeError(Exception):
    """Flags, checkpoints or images that cannot make a picture; reported in one line."""


def default_layers(fused, count=4):
    """Up to ``count`` of the fused layers, evenly spread, the first and the last included."""
    if len(fused) <= count:
        return list(fused)
    return [fused[round(k * (len(fused) - 1) / (count - 1))] for k in range(count)]


def load_images(args, count):
    """(N, 3, S, S) normalised model inputs, evenly spaced over the data set or the files of --image-dir,
    and a label for each."""
    transform = datasets.build_transform(False, args)
    if args.image_dir:
        if not os.path.isdir(args.image_dir):
            raise VisualizeError(f'--image-dir {args.image_dir} is not a folder')
        files = sorted(f for f in os.listdir(args.image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise VisualizeError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {args.image_dir}')
        picks = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
        images = [transform(Image.open(os.path.join(args.image_dir, files[i])).convert('RGB')) for i in picks]
        return torch.stack(images), [files[i] for i in picks]
    dataset, _ = datasets.build_dataset(False, args)
    if len(dataset) == 0:
        raise VisualizeError(f'the {args.data_set} evaluation split in {args.data_path} is empty')
    picks = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    samples = [dataset[int(i)] for i in picks]
    names = getattr(dataset, 'classes', None)
    return (torch.stack([x for x, _ in samples]),
            [f'#{i}' + (f' {names[y]}' if names else '') for i, (_, y) in zip(picks, samples)])


def build(args):
    """The model (eval mode, on args.device) and a line saying where its weights come from."""
    state = None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise VisualizeError(f'--resume {args.resume}: no such file')
        try:
            checkpoint = utils.read_checkpoint(args.resume)
        except ValueError as e:
            raise VisualizeError(f'--resume {args.resume} {e}') from e
        state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
        changes = main.model_setting_changes(vars(args), main.checkpoint_flags(checkpoint)) \
            if isinstance(checkpoint, dict) else []
    classes = state['head.weight'].shape[0] if state is not None and 'head.weight' in state else 1000
    utils.seed_everything(args.seed)
    model = main.build_model(args, classes)
    if state is not None:
        misfit = utils.state_dict_misfit(model.state_dict(), state)
        if misfit:
            raise VisualizeError(f'checkpoint {args.resume} does not fit the model: {misfit}')
        model.load_state_dict(state)
        origin = f'weights: {args.resume}'
        if changes:  # drawn as asked (what these settings would fuse in that model), and said so
            print(f'visualize_fusion.py: warning: model settings differ from the checkpoint\'s: {"; ".join(changes)}',
                  file=sys.stderr)
            origin += f' (trained with other settings: {"; ".join(changes)})'
    else:
        origin = f'RANDOM INIT (no checkpoint, seed {args.seed}): untrained weights'
    return model.to(args.device).eval(), origin


def group_colour(first_patch):
    """A colour per merged token, fixed by its first patch in raster order (so it stays while the token grows);
    golden-ratio hue steps keep neighbouring patches' colours apart."""
    return np.array(colorsys.hsv_to_rgb((first_patch * 0.618034) % 1.0, 0.85, 0.95))


def cell_picture(image, holder, side):
    """image (S, S, 3) in [0, 1]; holder (M,) token of each patch in raster order. Returns the tinted image and the
    outline segments (in pixels) between patches held by different tokens, where one of them is merged. Each patch
    is its 1/side share of the image (for overlapping patches, stride < patch size, the area around its centre)."""
    patch = image.shape[0] / side
    grid = holder.reshape(side, side)
    counts = np.bincount(holder)
    out = image.copy()
    for token in np.flatnonzero(counts > 1):
        cells = np.argwhere(grid == token)
        colour = group_colour(int(np.flatnonzero(holder == token)[0]))
        for gy, gx in cells:
            y0, y1, x0, x1 = (int(round(v * patch)) for v in (gy, gy + 1, gx, gx + 1))
            out[y0:y1, x0:x1] = 0.45 * out[y0:y1, x0:x1] + 0.55 * colour
    merged = counts[grid] > 1
    segments = []
    for gy in range(side):
        for gx in range(side):
            if gx + 1 < side and grid[gy, gx] != grid[gy, gx + 1] and (merged[gy, gx] or merged[gy, gx + 1]):
                segments.append([((gx + 1) * patch, gy * patch), ((gx + 1) * patch, (gy + 1) * patch)])
            if gy + 1 < side and grid[gy, gx] != grid[gy + 1, gx] and (merged[gy, gx] or merged[gy + 1, gx]):
                segments.append([(gx * patch, (gy + 1) * patch), ((gx + 1) * patch, (gy + 1) * patch)])
    return out, segments


def sequence_strip(holder, cls_out, num_tokens):
    """(1, num_tokens, 3) colours of the token sequence: grey ramp by first patch for single-patch tokens, the
    group colour for merged ones, black for the class token."""
    counts = np.bincount(holder, minlength=num_tokens)
    first = np.full(num_tokens, len(holder))
    np.minimum.at(first, holder, np.arange(len(holder)))
    strip = np.zeros((1, num_tokens, 3))
    for j in range(num_tokens):
        if j == cls_out:
            continue
        if counts[j] > 1:
            strip[0, j] = group_colour(int(first[j]))
        else:
            strip[0, j] = 0.92 - 0.62 * first[j] / max(len(holder) - 1, 1)
    return strip


def draw(images, labels, maps, layers, model, origin, args):
    """One PNG: rows = images, columns = input and the chosen layers; maps[k] (N, M + 1) source map after
    layers[k]."""
    rows, cols = len(images), 1 + len(layers)
    width, height = grid_size(rows, cols)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fusion = model.fusion_summary()
    setting = (f"{fusion['strategy']} (layer {fusion['layer']}, r={fusion['token']})"
               if fusion['strategy'] in ('lower', 'upper') else f"{fusion['strategy']} (r={fusion['token']})")
    fig.text(0.5, 1 - 3 / height, f"{args.model}\nfusion {setting}, order {fusion['order']}, class token "
             f"{args.cls_position} | {origin}", ha='center', va='top', fontsize=7,
             color='red' if not args.resume else 'black')
    fig.text(0.5, 1 - 29 / height, 'tint + outline: a token holding 2+ patches | strip: the token sequence (grey: '
             'one patch, light to dark in raster order; black: class token) | >: where the class token sits',
             ha='center', va='top', fontsize=6, color='dimgray')
    side = model.patch_embed.grid_size[0]
    cls_init = model.cls_index_init
    cls_row, cls_col = divmod(cls_init, side)  # the class token sits just before this patch

    def axes(col, row, top, h):  # pixel box -> figure fraction
        x = col * (CELL + 2 * PAD) + PAD
        y = HEADER + row * ROW + top
        return fig.add_axes([x / width, 1 - (y + h) / height, CELL / width, h / height])

    for r in range(rows):
        image = (images[r].permute(1, 2, 0).numpy() * np.array(IMAGENET_DEFAULT_STD) + np.array(IMAGENET_DEFAULT_MEAN))
        image = image.clip(0, 1)
        patch = image.shape[0] / side
        extent = (0, image.shape[1], image.shape[0], 0)  # pixel edges, as the outline segments
        for c in range(cols):
            ax = axes(c, r, TITLE, CELL)
            ax.set_axis_off()
            if c == 0:
                ax.imshow(image, extent=extent)
                ax.set_title(labels[r], fontsize=7, pad=2)
            else:
                source = maps[c - 1][r].numpy()
                holder = np.delete(source, cls_init)
                tinted, segments = cell_picture(image, holder, side)
                ax.imshow(tinted, extent=extent)
                ax.add_collection(LineCollection(segments, colors='white', linewidths=0.6))
                tokens = model.tokens_per_layer[layers[c - 1]]
                ax.set_title(f'layer {layers[c - 1]}: {tokens} tokens', fontsize=7, pad=2)
                strip = axes(c, r, TITLE + CELL + 2, STRIP - 4)
                strip.imshow(sequence_strip(holder, int(source[cls_init]), tokens), aspect='auto',
                             interpolation='nearest')
                strip.set_xticks([])
                strip.set_yticks([])
            ax.plot(cls_col * patch + 0.25 * patch, (cls_row + 0.5) * patch, marker='>', markersize=5,
                    color='white', markeredgecolor='black', markeredgewidth=0.8)
            ax.set_xlim(0, image.shape[1])
            ax.set_ylim(image.shape[0], 0)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # RGB without the alpha channel (the background is white): a smaller file
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(args.output, optimize=True)


def get_args_parser():
    parser = argparse.ArgumentParser('visualize_fusion.py', parents=[main.get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True, metavar='FILE.png', help='the PNG to write')
    parser.add_argument('--images', type=int, default=4, metavar='N', help='rows: number of images')
    parser.add_argument('--layers', type=int, nargs='+', default=None, metavar='I',
                        help='fused layers to show (0-indexed; default: up to four spread over the fused ones)')
    parser.add_argument('--image-dir', default='', help='take the images from the files of this folder instead '
                        'of --data-set/--data-path')
    return parser


def run(args):
    if Figure is None:
        raise VisualizeError('matplotlib is needed to draw (pip install matplotlib, see vim_requirements.txt)')
    if args.images < 1:
        raise VisualizeError('--images must be >= 1')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise VisualizeError(f'--device {args.device} was asked for but CUDA is not available; use --device cpu')
    model, origin = build(args)
    fused = model.fusion_summary()['fused_layers']
    if not fused:
        raise VisualizeError('no layer fuses tokens with these flags (set --fusion-strategy and --fusion-token)')
    layers = args.layers or default_layers(fused)
    if any(i not in fused for i in layers):
        raise VisualizeError(f'--layers {" ".join(map(str, layers))}: not all are fused layers; these fuse: '
                             f'{" ".join(map(str, fused))}')
    images, labels = load_images(args, args.images)
    sources = []
    with torch.no_grad():
        model(images.to(args.device), sources)
    draw(images, labels, [sources[i].cpu() for i in layers], layers, model, origin, args)
    print(f'wrote {args.output}: {len(images)} images x layers {" ".join(map(str, layers))}')


if __name__ == '__main__':
    cli_args = get_args_parser().parse_args()
    try:
        run(cli_args)
    except (VisualizeError, main.UsageError, datasets.DataSetError) as err:
        sys.exit(f'visualize_fusion.py: error: {err}')
