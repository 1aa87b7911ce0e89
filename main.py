"""Famba-V / Vim training and evaluation (DeiT-style script).

Single process:  python main.py --data-set CIFAR --data-path ./datasets/cifar-100-python ...
Several:         torchrun --nproc_per_node=N main.py ...
                 python -m torch.distributed.launch --nproc_per_node=N --use_env main.py ...
"""
import argparse
import json
import os
import sys
import time

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import datasets
import engine
import models_mamba  # noqa: F401  (registers the Vim models with timm)
import samplers
import ssm_ops
import utils

DEFAULT_MODEL = 'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'
FUSION_STRATEGIES = ('no', 'none', 'all', 'interleaved', 'alternate', 'lower', 'upper')
SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'constant', 'rsqrt')  # timm's, but for 'plateau'


class UsageError(Exception):
    """Flags, model settings or checkpoints that cannot work together; reported without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``main.py: error: ...``) in place of the usage block before it."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (main.py --help lists the flags)\n')


def get_args_parser():
    parser = argparse.ArgumentParser('Famba-V training and evaluation script', add_help=False)
    parser.add_argument('--batch-size', default=64, type=int, help='per-process batch size')
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--print-freq', default=10, type=int,
                        help='steps between progress lines (each reads the loss from the device once)')

    # Model
    parser.add_argument('--model', default=DEFAULT_MODEL, type=str, metavar='MODEL')
    parser.add_argument('--input-size', default=224, type=int, help='image size')
    parser.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    parser.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path rate')
    parser.add_argument('--depth', type=int, default=None, help="number of layers (default: the model's own)")
    parser.add_argument('--embed-dim', type=int, default=None, help="embedding width (default: the model's own)")
    parser.add_argument('--patch-size', type=int, default=None, help="patch size (default: the model's own)")
    parser.add_argument('--cls-position', default='head', choices=['head', 'middle'],
                        help="class token at position 0 (Famba-V) or M//2 (Vim's checkpoints)")
    parser.add_argument('--ssm-backend', default='auto', choices=ssm_ops.BACKENDS,
                        help='mixer kernels: triton (kernels/), cuda (mamba-ssm + causal-conv1d), '
                             'torch (pure PyTorch), auto (on CUDA the first of triton, cuda that fits, else torch)')

    # Famba-V token fusion
    parser.add_argument('--fusion-strategy', default='no', choices=FUSION_STRATEGIES,
                        help='layers that fuse tokens: no, all, interleaved (odd layers), '
                             'lower (layers < L), upper (layers > L)')
    parser.add_argument('--fusion-layer', default=0, type=int, help='boundary layer L (0-indexed, not fused)')
    parser.add_argument('--fusion-token', default=0, type=int, help='tokens removed in each fusing layer')
    parser.add_argument('--fusion-order', default='released', choices=['released', 'spatial'],
                        help='token order after fusion: released (unfused A then B) or spatial (original order)')
    parser.add_argument('--fusion-mode', default='mean', choices=['mean', 'size'],
                        help='fused value: plain mean (paper) or token-size-weighted mean (ToMe)')

    # Model EMA
    parser.add_argument('--model-ema', action='store_true')
    parser.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    parser.set_defaults(model_ema=True)
    parser.add_argument('--model-ema-decay', type=float, default=0.99996)
    parser.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                        help='keep the EMA on the CPU (it is then not evaluated during a GPU run)')

    # Optimizer
    parser.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    parser.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    parser.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    parser.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient norm clipping')
    parser.add_argument('--momentum', type=float, default=0.9, metavar='M')
    parser.add_argument('--weight-decay', type=float, default=0.05)

    # Learning rate schedule (stepped once per epoch, at the epoch's start, unless --sched-on-updates)
    parser.add_argument('--sched', default='cosine', choices=SCHEDULES,
                        help="timm's schedules that step without a metric (not 'plateau')")
    parser.add_argument('--sched-on-updates', action='store_true',
                        help='step the schedule (warmup included) after every update instead of every epoch')
    parser.add_argument('--lr', type=float, default=5e-4, metavar='LR',
                        help='learning rate for a global batch of 512 (scaled linearly unless --unscale-lr)')
    parser.add_argument('--unscale-lr', action='store_true', help='use --lr as given, without batch scaling')
    parser.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    parser.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    parser.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    parser.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    parser.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    parser.add_argument('--decay-epochs', type=float, default=30, metavar='N', help='step schedule interval')
    parser.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    parser.add_argument('--cooldown-epochs', type=int, default=10, metavar='N',
                        help='accepted for DeiT/Vim command lines; as there, it has no effect (training runs --epochs)')
    parser.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                        help='accepted for DeiT command lines; no effect (the plateau schedule is not offered)')
    parser.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    # Augmentation
    parser.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='AutoAugment policy ("none" to disable)')
    parser.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    parser.add_argument('--train-interpolation', type=str, default='bicubic',
                        help='random, bilinear or bicubic')
    parser.add_argument('--repeated-aug', action='store_true')
    parser.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    parser.set_defaults(repeated_aug=True)
    parser.add_argument('--eval-crop-ratio', default=0.875, type=float, help='evaluation crop ratio')

    # Random erasing
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT')
    parser.add_argument('--remode', type=str, default='pixel')
    parser.add_argument('--recount', type=int, default=1)

    # Mixup / CutMix
    parser.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0 = off)')
    parser.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    parser.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    parser.add_argument('--mixup-prob', type=float, default=1.0)
    parser.add_argument('--mixup-switch-prob', type=float, default=0.5)
    parser.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])

    # Fine-tuning
    parser.add_argument('--finetune', default='', help='initialise from this Vim/Famba-V checkpoint')
    parser.add_argument('--finetune-cls-position', default='middle', choices=['head', 'middle'],
                        help="class-token position in the --finetune checkpoint (official Vim: middle)")

    # Data
    parser.add_argument('--data-path', default='./datasets/imagenet', type=str)
    parser.add_argument('--data-set', default='IMNET', choices=datasets.DATA_SETS, type=str)
    parser.add_argument('--output_dir', default='', help='where to save logs and checkpoints (empty: none)')
    parser.add_argument('--device', default='cuda', help='cuda or cpu')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='', help='resume from this checkpoint')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N')
    parser.add_argument('--eval', action='store_true', help='only evaluate (with --resume)')
    parser.add_argument('--dist-eval', action='store_true', default=False,
                        help='shard evaluation over the processes')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--pin-mem', action='store_true')
    parser.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)

    # Distributed
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--local-rank', '--local_rank', default=0, type=int, dest='local_rank')
    parser.add_argument('--dist-backend', default=None, choices=['nccl', 'gloo'],
                        help='process-group backend (default: nccl on CUDA, gloo on the CPU); with gloo on CUDA, '
                             'processes beyond the GPU count share GPUs')

    # Precision and speed
    parser.add_argument('--if_amp', action='store_true', help='automatic mixed precision (default)')
    parser.add_argument('--no_amp', action='store_false', dest='if_amp', help='train in fp32')
    parser.set_defaults(if_amp=True)
    parser.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                        help='autocast dtype; float16 uses loss scaling')
    parser.add_argument('--if_continue_inf', action='store_true', default=False,
                        help='keep training when the loss is NaN/inf instead of stopping; a step whose gradients '
                             'are not finite then changes nothing (as in Vim)')
    parser.add_argument('--cuda-graph', action=argparse.BooleanOptionalAction, default=None,
                        help='train with the step captured in CUDA graphs (default on CUDA; the update is '
                             'captured with AdamW/Adam and runs eagerly after the replay with other optimizers; '
                             '--no-cuda-graph: the eager step, op by op)')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls/convolutions on CUDA')
    return parser


def check_args(args):
    """Reject combinations that cannot work, before anything is built."""
    if args.batch_size < 1 or args.print_freq < 1:
        raise UsageError(f'--batch-size and --print-freq must be >= 1, got {args.batch_size} and {args.print_freq}')
    for dest in ('depth', 'embed_dim', 'patch_size', 'input_size'):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            raise UsageError(f'{flag_name(dest)} must be >= 1, got {getattr(args, dest)}')
    for dest, low, high in (('drop', 0, 1), ('drop_path', 0, 1), ('smoothing', 0, 1), ('reprob', 0, 1),
                            ('mixup_prob', 0, 1), ('mixup_switch_prob', 0, 1), ('model_ema_decay', 0, 1)):
        if not low <= getattr(args, dest) <= high:
            raise UsageError(f'{flag_name(dest)} must be in [{low}, {high}], got {getattr(args, dest)}')
    for dest in ('lr', 'min_lr', 'warmup_lr', 'weight_decay', 'mixup', 'cutmix', 'num_workers', 'warmup_epochs'):
        if getattr(args, dest) < 0:
            raise UsageError(f'{flag_name(dest)} must be >= 0, got {getattr(args, dest)}')
    if args.opt.lower().split('_')[-1] not in timm.optim.list_optimizers():
        raise UsageError(f'unknown --opt {args.opt!r}; timm has: {", ".join(timm.optim.list_optimizers())}')
    if args.finetune and not os.path.isfile(args.finetune):
        raise UsageError(f'--finetune {args.finetune}: no such file')
    use_cuda = args.device.startswith('cuda')
    if args.cuda_graph and not use_cuda:
        raise UsageError('--cuda-graph needs --device cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device} was asked for but CUDA is not available; use --device cpu')
    if args.dist_backend == 'nccl' and not use_cuda:
        raise UsageError(f'--dist-backend nccl needs --device cuda; with --device {args.device} use gloo')
    local_rank = int(os.environ.get('LOCAL_RANK', args.local_rank))
    launched = 'WORLD_SIZE' in os.environ
    if use_cuda and launched and args.dist_backend != 'gloo' and local_rank >= torch.cuda.device_count():
        raise UsageError(f'local rank {local_rank}, but {torch.cuda.device_count()} GPU(s) are visible: NCCL takes '
                         'one GPU per process; launch fewer processes per node, or share GPUs with '
                         '--dist-backend gloo')
    if (utils.slurm_tasks() > 1 and not launched and args.dist_url == 'env://'
            and not {'MASTER_ADDR', 'MASTER_PORT'} <= set(os.environ)):
        raise UsageError(f'srun started {utils.slurm_tasks()} tasks, but MASTER_ADDR and MASTER_PORT are not set: '
                         'export them in the job script (the first node\'s host name and a free port), or run '
                         'torchrun under srun')
    if args.eval and not args.resume:
        raise UsageError('--eval needs --resume CHECKPOINT (the model to evaluate)')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.mixup_mode in ('batch', 'pair') and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix in {args.mixup_mode} mode needs an even --batch-size, got {args.batch_size}')
    if args.epochs < 1 and not args.eval:
        raise UsageError(f'--epochs must be >= 1, got {args.epochs}')
    if args.ssm_backend in ssm_ops.KERNEL_BACKENDS and not args.device.startswith('cuda'):
        raise UsageError(f'--ssm-backend {args.ssm_backend} runs on CUDA tensors only; with --device {args.device} '
                         'use --ssm-backend torch (or auto)')
    models = timm.list_models(module='models_mamba')
    if args.model not in models:
        raise UsageError(f'unknown --model {args.model!r}; the models are: {", ".join(models)}')
    shape_only_model(args)  # the model's own checks of its sizes and fusion settings, before any data is read


def shape_only_model(args):
    """The model the flags build, on the meta device (shapes, no data; instant), with a 1-class head."""
    with torch.device('meta'):
        return build_model(args, 1)


def resolve_cuda_graph(args):
    """--cuda-graph unset: the captured step on CUDA. Where the optimizer's update cannot be captured, a notice
    says that it runs eagerly after the captured forward and backward."""
    if args.cuda_graph is None:
        args.cuda_graph = args.device.startswith('cuda')
    if args.cuda_graph and args.opt.lower() not in engine.CAPTURED_UPDATE_OPTS:
        print(f'Note: --opt {args.opt}: forward and backward run as a CUDA graph and the update eagerly after it '
              f'(a captured update needs learning rates on the device: {", ".join(engine.CAPTURED_UPDATE_OPTS)})')


def amp_settings(args, device):
    """(autocast dtype or None for fp32, GradScaler or None)."""
    if not args.if_amp:
        return None, None
    dtype = getattr(torch, args.amp_dtype)
    if device.type != 'cuda' and dtype == torch.float16:
        print('Note: float16 autocast is CUDA-only here; training in fp32 on the CPU '
              '(use --amp-dtype bfloat16 for bf16 autocast on the CPU)')
        return None, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler


def build_model(args, nb_classes):
    size_kwargs = {k: getattr(args, k) for k in ('depth', 'embed_dim', 'patch_size') if getattr(args, k) is not None}
    try:
        return timm.create_model(
            args.model, pretrained=False, num_classes=nb_classes, img_size=args.input_size,
            drop_rate=args.drop, drop_path_rate=args.drop_path,
            fusion_strategy=args.fusion_strategy, fusion_layer=args.fusion_layer, fusion_token=args.fusion_token,
            fusion_order=args.fusion_order, fusion_mode=args.fusion_mode, cls_position=args.cls_position,
            ssm_backend=args.ssm_backend, **size_kwargs)
    except ValueError as e:  # invalid fusion/model settings, raised by the model's constructor
        raise UsageError(f'cannot build {args.model}: {e}') from e


def build_loaders(args, dataset_train, dataset_val, device):
    world, rank = utils.get_world_size(), utils.get_rank()
    pin = args.pin_mem and device.type == 'cuda'
    # in every launch form, one process or several, as DeiT's and Vim's main.py (so `python main.py` trains as a
    # one-process launch does); shuffled with their own seed and the epoch, not the global generator
    if args.repeated_aug:
        sampler_train = samplers.RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                            shuffle=True, seed=args.seed)
    if args.distributed and args.dist_eval:
        sampler_val = samplers.DistributedEvalSampler(dataset_val, num_replicas=world, rank=rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    # Workers persist across epochs (re-spawning many of them costs seconds per epoch); the epoch tags let
    # them reseed per epoch, so a resumed run augments as an uninterrupted one. drop_last: a fixed batch shape
    # (captured step, batch mixup).
    sampler_train = samplers.EpochSampler(sampler_train)
    persist = args.num_workers > 0
    loader_train = torch.utils.data.DataLoader(
        samplers.EpochSeededDataset(dataset_train, args.seed, rank), sampler=sampler_train,
        batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin, drop_last=True,
        persistent_workers=persist, generator=torch.Generator())  # base seeds not from the global generator
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), num_workers=args.num_workers,
        pin_memory=pin, drop_last=False, persistent_workers=persist)
    if len(loader_train) == 0:
        raise UsageError(f'the training set ({len(dataset_train)} images over {world} process(es)) is smaller '
                         f'than one batch of {args.batch_size}')
    return loader_train, loader_val


def evaluate_all(args, loader_val, model_without_ddp, model_ema, device, amp_dtype):
    sync = args.distributed and args.dist_eval
    stats = {f'test_{k}': v for k, v in engine.evaluate(loader_val, model_without_ddp, device,
                                                         amp_dtype=amp_dtype, sync=sync).items()}
    if model_ema is not None and next(model_ema.module.parameters()).device.type == device.type:  # cuda:0 vs cuda
        ema = engine.evaluate(loader_val, model_ema.module, device, amp_dtype=amp_dtype, sync=sync)
        stats.update({f'test_ema_{k}': v for k, v in ema.items()})
    return stats


RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'log.txt', 'summary.json')  # what a training run writes
# flags that only say where things are or how the processes and the step are run: not a change of the run on
# --resume (the captured and the eager step train alike)
BOOKKEEPING_FLAGS = {'resume', 'output_dir', 'data_path', 'start_epoch', 'eval', 'print_freq', 'num_workers',
                     'pin_mem', 'dist_url', 'local_rank', 'rank', 'gpu', 'distributed', 'dist_backend', 'cuda_graph'}
SHAPE_FLAGS = ('model', 'depth', 'embed_dim', 'patch_size', 'input_size')  # what the weights' shapes follow
FUSION_DEFAULTS = {'fusion_layer': 0, 'fusion_token': 0, 'fusion_order': 'released', 'fusion_mode': 'mean'}
STRATEGY_ALIASES = {'none': 'no', 'alternate': 'interleaved'}


_FLAG_NAMES = {}


def flag_name(dest):
    """The option a user types for an argparse dest: 'unscale_lr' -> '--unscale-lr'."""
    if not _FLAG_NAMES:
        for action in get_args_parser()._actions:
            if action.option_strings:
                _FLAG_NAMES.setdefault(action.dest, action.option_strings[0])
    return _FLAG_NAMES.get(dest, '--' + dest)


def check_output_dir(args):
    """Before any data, model or evaluation (creates nothing): refuse an --output_dir that cannot be a writable
    folder; for training, one that holds another run's files. A folder holding a checkpoint.pth, without
    --resume, is resumed from it (args.resume is set; returns True), provided the checkpoint was written with
    the same flags, which load_checkpoint checks: running the same command again continues (or reports) the run."""
    if not args.output_dir:
        return False
    path = os.path.abspath(args.output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'--output_dir {args.output_dir}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'--output_dir {args.output_dir}: cannot write in {existing}')
    if args.eval or existing != path:
        return False
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if not held:
        return False  # a new or empty folder (the run scripts mkdir -p it), or one with other files only
    if args.resume:
        if os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) == os.path.realpath(path):
            return False  # continuing the run that lives there
        raise UsageError(f'--output_dir {args.output_dir} holds another run ({", ".join(held)}), which resuming '
                         f'from {args.resume} would overwrite; pick an empty --output_dir or the checkpoint\'s folder')
    if 'checkpoint.pth' not in held:
        raise UsageError(f'--output_dir {args.output_dir} already holds files of a run ({", ".join(held)}) but no '
                         'checkpoint.pth to continue it from: move them away or pick an empty --output_dir')
    args.resume = os.path.join(args.output_dir, 'checkpoint.pth')
    return True


def effective_flags(args):
    """vars(args) with --lr scaled as main() scales it, as the checkpoint's 'args' hold it."""
    flags = dict(vars(args))
    if not args.unscale_lr:
        flags['lr'] = args.lr * args.batch_size * utils.get_world_size() / 512.0
    return flags


def prepare_output_dir(output_dir):
    """Rank 0, just before the first write: create the folder and delete temp files left by a killed save."""
    os.makedirs(output_dir, exist_ok=True)
    stale = utils.remove_stale_temp_files(output_dir)
    if stale:
        print(f'Removed {len(stale)} temp file(s) left by an interrupted save: {", ".join(stale)}')


def model_settings(flags):
    """The flags that change what a checkpoint's weights compute without changing their shapes (shape changes
    fail when the weights are loaded), normalised so that settings with the same effect compare equal."""
    strategy = flags.get('fusion_strategy', 'no')
    s = {'cls_position': flags.get('cls_position', 'head'), 'fusion_strategy': STRATEGY_ALIASES.get(strategy, strategy),
         **{k: flags.get(k, d) for k, d in FUSION_DEFAULTS.items()}}
    if s['fusion_strategy'] == 'no' or not s['fusion_token']:
        s.update(fusion_strategy='no', **FUSION_DEFAULTS)
    elif s['fusion_strategy'] in ('all', 'interleaved'):
        s['fusion_layer'] = 0
    return s


def model_setting_changes(flags, saved_flags):
    """['--fusion-token 4 (checkpoint: 2)', ...] for the model settings that differ from the checkpoint's."""
    if not saved_flags:
        return []
    now, then = model_settings(flags), model_settings(saved_flags)
    return [f'{flag_name(k)} {now[k]} (checkpoint: {then[k]})' for k in now if now[k] != then[k]]


def run_changes(flags, saved_flags):
    """{flag: [checkpoint's value, current value]} for the run's flags that changed since the checkpoint."""
    keys = sorted((set(flags) | set(saved_flags)) - BOOKKEEPING_FLAGS)
    return {k: [saved_flags.get(k), flags.get(k)] for k in keys if flags.get(k) != saved_flags.get(k)}


def checkpoint_flags(checkpoint):
    """The flags a checkpoint was written with, as a dict: main.py saves a dict, DeiT-style code (Vim's and the
    Famba-V release's main.py) the argparse.Namespace itself; {} where there are none (official Vim weights)."""
    saved = checkpoint.get('args')
    if isinstance(saved, argparse.Namespace):
        return vars(saved)
    return saved if isinstance(saved, dict) else {}


def load_checkpoint(args, auto=False):
    """Read and check the --resume checkpoint before anything is built; every problem is a UsageError.

    Training refuses model settings that differ from the checkpoint's (it would continue another model) and an
    --epochs below what the checkpoint has trained; --eval warns about them and evaluates the model as the
    current flags build it. ``auto``: the checkpoint was found in --output_dir (no --resume given), and is only
    resumed when it was written with the same flags. Returns (checkpoint, list of differing model settings)."""
    path = args.resume
    what = f'{path} (the checkpoint in --output_dir)' if auto else f'--resume {path}'
    if not os.path.exists(path):
        raise UsageError(f'{what}: no such file')
    if os.path.isdir(path):
        raise UsageError(f'{what} is a folder; give the checkpoint file '
                         f'({os.path.join(path, "checkpoint.pth")})')
    if os.path.getsize(path) == 0:
        raise UsageError(f'{what} is empty (0 bytes): it is not a finished checkpoint')
    try:
        checkpoint = utils.read_checkpoint(path)
    except ValueError as e:
        raise UsageError(f'{what} {e}') from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('model'), dict):
        raise UsageError(f'{what} is not a checkpoint of main.py (no "model" weights in it); '
                         'plain weights are loaded with --finetune')
    saved_flags = checkpoint_flags(checkpoint)
    if auto:
        changed = run_changes(effective_flags(args), saved_flags)
        if changed or not saved_flags:
            differ = ', '.join(f'{flag_name(k)} {new} (checkpoint: {old})' for k, (old, new) in changed.items())
            raise UsageError(f'--output_dir {args.output_dir} already holds a run (checkpoint.pth of epoch '
                             f'{checkpoint.get("epoch")}) with other flags: {differ or "unknown"}. To continue it '
                             f'with these flags add --resume {path}; for a new run pick an empty --output_dir. '
                             'Nothing was changed')
        print(f'--output_dir {args.output_dir} holds a checkpoint of this run (same flags): resuming from {path}')
    # the head's shape follows the data set's classes, which are not read yet: resume_state checks it
    body = [{k: v for k, v in state.items() if not k.startswith('head.')}
            for state in (shape_only_model(args).state_dict(), checkpoint['model'])]
    misfit = utils.state_dict_misfit(*body)
    if misfit:
        differ = [f'{flag_name(k)} {getattr(args, k)} (checkpoint: {saved_flags[k]})' for k in SHAPE_FLAGS
                  if k in saved_flags and saved_flags[k] != getattr(args, k)]
        raise UsageError(f'{what} does not fit the model these flags build'
                         + (f' ({"; ".join(differ)})' if differ else '') + f': {misfit}')
    changes = model_setting_changes(vars(args), saved_flags)
    if args.eval:
        if not saved_flags:
            print(f'main.py: warning: {path} holds no flags (it was not written by main.py), so its class-token '
                  f'position and fusion settings cannot be checked: evaluating it with --cls-position '
                  f'{args.cls_position} (official Vim checkpoints need --cls-position middle)', file=sys.stderr,
                  flush=True)
        if changes:
            print(f'main.py: warning: --eval with model settings that differ from {path}: {"; ".join(changes)}. '
                  'The accuracy is that of the model as the current flags build it.', file=sys.stderr, flush=True)
        return checkpoint, changes
    missing = [k for k in ('optimizer', 'epoch') if k not in checkpoint]
    if missing:
        raise UsageError(f'{what} holds no training state (no {" or ".join(missing)}): evaluate it with '
                         '--eval, or train from its weights with --finetune')
    if changes:
        raise UsageError(f'{what}: model settings differ from the checkpoint\'s: {"; ".join(changes)}. '
                         'A resumed run continues the checkpoint\'s model: drop these flags, or start a new run '
                         'from its weights with --finetune')
    trained = checkpoint['epoch'] + 1
    if args.epochs < trained:
        raise UsageError(f'--epochs {args.epochs}, but {path} has trained {trained} epochs already; '
                         f'use --epochs {trained} (report the finished run) or more (train on)')
    return checkpoint, changes


def _history_from_log(checkpoint_path, last_epoch):
    """Epoch records of a checkpoint written before the history was kept in it: its folder's log.txt, up to its
    epoch, the last line of each epoch winning (logs of re-runs into the same folder repeat epochs)."""
    by_epoch = {}
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), 'log.txt')) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get('epoch'), int) and record['epoch'] <= last_epoch:
                    by_epoch[record['epoch']] = record
    except OSError:
        return []
    return [by_epoch[e] for e in sorted(by_epoch)]


def resume_state(args, checkpoint, model, model_ema, optimizer, lr_scheduler, loss_scaler, updates_per_epoch):
    """Load the checkpoint's weights and, for training, the run's state; returns where and how to go on.

    The learning-rate schedule is the one the current flags describe: the scheduler built from them is kept
    (the checkpoint's scheduler state is not loaded) and only put at the checkpoint's position, and the
    optimizer's hyper-parameters (lr, initial_lr, weight decay, betas, ...) stay those of the current flags;
    only its state (moments, step counts) comes from the checkpoint."""
    state = {'start_epoch': args.start_epoch, 'history': [], 'elapsed_s': 0.0, 'peak_mem_mib': None,
             'resumes': [], 'max_acc1': None, 'max_acc5': None}
    if checkpoint is None:
        return state
    misfit = utils.state_dict_misfit(model.state_dict(), checkpoint['model'])
    if misfit:
        raise UsageError(f'checkpoint {args.resume} does not fit the model: {misfit}')
    model.load_state_dict(checkpoint['model'])
    if model_ema is not None:
        if checkpoint.get('model_ema') is None:
            raise UsageError(f'{args.resume} holds no EMA weights; resume with --no-model-ema')
        model_ema.module.load_state_dict(checkpoint['model_ema'])
    print(f'Resumed from {args.resume} (epoch {checkpoint.get("epoch")})')
    if args.eval:
        return state
    # the saved groups take the current hyper-parameters before loading, so that load_state_dict also places
    # the state as the current flags want it (e.g. capturable / fused keep their step counts on the device)
    saved = checkpoint['optimizer']
    groups = [{**saved_group, **{k: v for k, v in group.items() if k != 'params'}}
              for saved_group, group in zip(saved['param_groups'], optimizer.param_groups)]
    try:
        optimizer.load_state_dict({**saved, 'param_groups': groups + saved['param_groups'][len(groups):]})
    except (ValueError, KeyError) as e:
        raise UsageError(f'the optimizer state in {args.resume} does not fit the model and --opt {args.opt}: '
                         f'{e}') from e
    start = checkpoint['epoch'] + 1
    if args.sched_on_updates:  # where the uninterrupted run's last step_update left the lr
        lr_scheduler.step_update(start * updates_per_epoch)
    if loss_scaler is not None and checkpoint.get('scaler') is not None:
        loss_scaler.load_state_dict(checkpoint['scaler'])
    history = checkpoint.get('history')
    if history is None:
        history = _history_from_log(args.resume, checkpoint['epoch'])
    changed = run_changes(vars(args), checkpoint_flags(checkpoint))
    resumes = list(checkpoint.get('resumes', []))
    if start < args.epochs:
        if changed:
            print('Note: flags changed since the checkpoint: '
                  + ', '.join(f'{flag_name(k)} {old} -> {new}' for k, (old, new) in changed.items())
                  + f'; epochs {start}..{args.epochs - 1} use the schedule of the current flags')
        resumes.append({'epoch': start, 'checkpoint': os.path.abspath(args.resume), 'changed': changed})
    else:
        print(f'{args.resume} has trained all {args.epochs} epochs: nothing to train, reporting that run')
    return {'start_epoch': start, 'history': list(history), 'elapsed_s': checkpoint.get('elapsed_s', 0.0),
            'peak_mem_mib': checkpoint.get('max_peak_mem_mib'), 'resumes': resumes,
            'max_acc1': checkpoint.get('max_acc1'), 'max_acc5': checkpoint.get('max_acc5')}


def best_record(history):
    """The epoch record with the highest top-1 (the first of equals: the one best_checkpoint.pth holds)."""
    return max(history, key=lambda e: e['test_acc1']) if history else None


def repair_output_dir(output_dir, checkpoint_path, epoch, history):
    """On resume (rank 0): put log.txt and best_checkpoint.pth in step with the checkpoint that a kill may have
    left them behind (log.txt is rewritten from the checkpoint's history, dropping lines past its epoch), or that
    --resume brings from another folder (its best_checkpoint.pth is copied along)."""
    utils.atomic_write_json_lines(history, os.path.join(output_dir, 'log.txt'))
    best = best_record(history)
    if best is None:
        return
    best_path = os.path.join(output_dir, 'best_checkpoint.pth')
    if _checkpoint_epoch(best_path) == best['epoch']:
        return
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), 'best_checkpoint.pth')
    source = checkpoint_path if best['epoch'] == epoch else beside
    if _checkpoint_epoch(source) == best['epoch']:
        utils.atomic_copy(source, best_path)
        print(f'Restored {best_path} (epoch {best["epoch"]}) from {source}')
    else:
        print(f'Note: no best_checkpoint.pth of epoch {best["epoch"]} (the best so far) beside {checkpoint_path}; '
              f'{best_path} is written when a later epoch beats it')


def _checkpoint_epoch(path):
    """The epoch a checkpoint file holds, None where there is none or it cannot be read."""
    try:
        return torch.load(path, map_location='cpu', weights_only=False, mmap=True).get('epoch')
    except Exception:
        return None


def save_epoch(output_dir, checkpoint, improved):
    """checkpoint.pth (holding the whole epoch history), best_checkpoint.pth if the epoch improved, then log.txt
    rewritten from that history, each atomically: a kill anywhere leaves a complete checkpoint, and a log that is
    in step with it or is put back in step by the resume."""
    epoch = checkpoint['epoch']
    utils.atomic_torch_save(checkpoint, os.path.join(output_dir, 'checkpoint.pth'))
    utils.fault_point(f'after_checkpoint:{epoch}')
    if improved:
        utils.atomic_torch_save(checkpoint, os.path.join(output_dir, 'best_checkpoint.pth'))
        utils.fault_point(f'after_best:{epoch}')
    utils.atomic_write_json_lines(checkpoint['history'], os.path.join(output_dir, 'log.txt'))
    utils.fault_point(f'after_log:{epoch}')


def fusion_cap_notice(model, args):
    requested, removed = model.requested_per_layer, model.removed_per_layer
    capped = [i for i, (q, r) in enumerate(zip(requested, removed)) if q != r]
    if capped:
        print(f'Note: --fusion-token {args.fusion_token} is more than layers {capped} can fuse (half of the tokens '
              f'entering a layer, class token aside): they remove {[removed[i] for i in capped]} tokens')


def gpu_names(device):
    """The GPU of every process (rank order); [] on the CPU."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else None
    names = [name]
    if utils.is_dist_avail_and_initialized():
        names = [None] * utils.get_world_size()
        torch.distributed.all_gather_object(names, name)
    return [n for n in names if n]


def rank_checksums(model, device):
    """[sum, sum of squares] of all parameters (float64) for every process, rank 0 first: identical lists when the
    processes trained in step, as their gradient averaging promises."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    local = torch.stack([flat.sum(), flat.square().sum()]).to(device)
    if utils.get_world_size() == 1:
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(utils.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.tolist() for g in gathered]


def make_summary(args, state, history, *, total_time, peaks, amp_dtype, model, n_parameters, fusion, gpus, git):
    final = history[-1] if history else {}
    best = best_record(history)
    legacy = not history and args.resume  # a checkpoint without history and without its log: maxima only
    return {
        'model': args.model,
        'architecture': {'depth': model.depth, 'embed_dim': model.embed_dim,
                         'patch_size': model.patch_embed.proj.kernel_size[0],
                         'stride': model.patch_embed.proj.stride[0], 'input_size': args.input_size,
                         'num_classes': model.num_classes, 'cls_position': args.cls_position},
        'total_time_s': total_time,
        'total_time': utils.format_hms(total_time),
        'max_peak_mem_mib': max(peaks) if peaks else None,
        'best_acc1': best['test_acc1'] if best else (state['max_acc1'] if legacy else None),
        'best_acc5': best['test_acc5'] if best else None,   # the best-top-1 epoch's, as best_checkpoint.pth has it
        'best_epoch': best['epoch'] if best else None,
        'max_acc5': max(e['test_acc5'] for e in history) if history else (state['max_acc5'] if legacy else None),
        'final_acc1': final.get('test_acc1'),
        'final_acc5': final.get('test_acc5'),
        'final_ema_acc1': final.get('test_ema_acc1'),
        'final_epoch': final.get('epoch'),
        'epochs': args.epochs,
        'world_size': utils.get_world_size(),
        'device': gpus[0] if gpus else 'cpu',
        'gpus': gpus,
        'precision': str(amp_dtype).replace('torch.', '') if amp_dtype is not None else 'float32',
        'n_parameters': n_parameters,
        'fusion': fusion,
        'torch_version': torch.__version__,
        'cuda_version': torch.version.cuda,
        'timm_version': timm.__version__,
        'git_commit': git[0],
        'git_dirty': git[1],
        'resumes': state['resumes'],
        'args': vars(args),
    }


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    resolve_cuda_graph(args)
    print(args)
    auto_resume = check_output_dir(args)  # before the data, the model and any evaluation
    resumed, setting_changes = load_checkpoint(args, auto_resume) if args.resume else (None, [])
    git = utils.git_commit(os.path.dirname(os.path.abspath(__file__)))
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as DeiT: the patch-embedding conv gets cuDNN's fastest algorithm
    if device.type == 'cuda' and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # same seed on every process for the model; data/augmentation seeds differ per process and epoch
    utils.seed_everything(args.seed)
    dataset_train, nb_classes = datasets.build_dataset(True, args)
    dataset_val, _ = datasets.build_dataset(False, args)
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val, device)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)

    print(f'Creating model: {args.model}')
    model = build_model(args, nb_classes)
    if args.finetune:
        try:
            checkpoint = utils.read_checkpoint(args.finetune)
        except ValueError as e:
            raise UsageError(f'--finetune {args.finetune} {e}') from e
        state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
        if not isinstance(state, dict):
            raise UsageError(f'--finetune {args.finetune} holds no state dict (a "model" entry or the weights)')
        try:
            utils.load_finetune_state(model, state, args.finetune_cls_position)
        except ValueError as e:
            raise UsageError(f'--finetune {args.finetune}: {e}') from e
        print(f'Loaded {args.finetune} for fine-tuning')
    model.to(device)
    model_without_ddp = model
    several = args.distributed and utils.get_world_size() > 1
    if several and not args.cuda_graph:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    elif several:  # the captured step averages gradients itself; like DDP, every process starts from rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    fusion = model_without_ddp.fusion_summary()
    print(f'number of params: {n_parameters}')
    print(f'token fusion: {json.dumps(fusion)}')
    fusion_cap_notice(model_without_ddp, args)
    print(f'mixer kernels: {model_without_ddp.layers[0].mixer.kernels(torch.empty(0, device=device))}')

    # EMA after the DDP wrap (or the broadcast): every process starts the same EMA from rank 0's weights
    model_ema = None
    if args.model_ema and not (args.eval and resumed is not None and resumed.get('model_ema') is None):
        # (--eval of weights without an EMA copy, official Vim's say, evaluates the weights alone)
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0
    opt_kwargs = optimizer_kwargs(cfg=args)
    if device.type == 'cuda' and args.opt.lower() in engine.CAPTURED_UPDATE_OPTS:
        # torch's fused AdamW/Adam: the captured step needs it (engine.CapturedTrainStep says why), and the
        # eager step then takes the same update (one kernel, no host sync for fp16 loss scaling)
        opt_kwargs['fused'] = True
        opt_kwargs['capturable'] = args.cuda_graph
    optimizer = create_optimizer_v2(model_without_ddp, **opt_kwargs)
    lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(loader_train))
    amp_dtype, loss_scaler = amp_settings(args, device)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is applied inside the mixup targets
    elif args.smoothing > 0.0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    state = resume_state(args, resumed, model_without_ddp, model_ema, optimizer, lr_scheduler, loss_scaler,
                         len(loader_train))
    del resumed  # its weights now live in the model (and the optimizer)

    if args.eval:
        stats = evaluate_all(args, loader_val, model_without_ddp, model_ema, device, amp_dtype)
        print(f'Accuracy of the network on the {stats["test_images"]} test images: {stats["test_acc1"]:.2f}%')
        if setting_changes:
            stats['settings_differ_from_checkpoint'] = setting_changes
        print(json.dumps(stats))
        if args.output_dir and utils.is_main_process():
            prepare_output_dir(args.output_dir)
            utils.atomic_write_json(stats, os.path.join(args.output_dir, 'eval.json'))
        return stats

    step = engine.build_train_step(model, criterion, optimizer, amp_dtype=amp_dtype, loss_scaler=loss_scaler,
                                   clip_grad=args.clip_grad, cuda_graph=args.cuda_graph,
                                   process_group=dist.group.WORLD if several and args.cuda_graph else None,
                                   skip_nonfinite=args.if_continue_inf)
    history = state['history']
    if args.output_dir and utils.is_main_process():
        prepare_output_dir(args.output_dir)
        if args.resume:
            repair_output_dir(args.output_dir, args.resume, state['start_epoch'] - 1, history)
        summary_path = os.path.join(args.output_dir, 'summary.json')
        if state['start_epoch'] < args.epochs and os.path.exists(summary_path):
            os.remove(summary_path)  # a finished part's summary: the run goes on, and writes its own at the end
            print(f'Removed {summary_path} of the epochs before: training goes on (to --epochs {args.epochs})')

    print(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    peaks = [] if state['peak_mem_mib'] is None else [state['peak_mem_mib']]
    # best so far: from the history; a checkpoint without one (older main.py, no log) has its maxima
    max_acc1, max_acc5 = (max((e[k] for e in history), default=float('-inf') if state[m] is None else state[m])
                          for k, m in (('test_acc1', 'max_acc1'), ('test_acc5', 'max_acc5')))
    epoch_batches = samplers.EpochBatches(loader_train)
    for epoch in range(state['start_epoch'], args.epochs):
        utils.seed_everything(args.seed, epoch, utils.get_rank())
        batches = epoch_batches(epoch)
        lr_scheduler.step(epoch)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        train_stats = engine.train_one_epoch(model, step, batches, optimizer, device, epoch,
                                             mixup_fn=mixup_fn, model_ema=model_ema,
                                             print_freq=args.print_freq, if_continue_inf=args.if_continue_inf,
                                             lr_scheduler=lr_scheduler if args.sched_on_updates else None,
                                             amp_dtype=amp_dtype)
        log = {'epoch': epoch, 'train_loss': train_stats['loss'], 'train_lr': train_stats['lr'],
               'epoch_time_s': train_stats['time_s'], 'train_images_per_s': train_stats['images_per_s']}
        if train_stats['setup_time_s']:
            log['setup_time_s'] = train_stats['setup_time_s']  # first steps: Triton compiles, graph capture
        if train_stats['nonfinite_steps']:
            log['train_nonfinite_steps'] = train_stats['nonfinite_steps']
        if device.type == 'cuda':
            # A CUDA graph's private pool is allocated once, at capture: count it in every epoch.
            peak = max(torch.cuda.max_memory_allocated(device), getattr(step, 'capture_peak_bytes', 0)) / 2 ** 20
        else:
            peak = utils.peak_rss_mib()
        if peak is not None:
            log['train_peak_mem_mib'] = peak
            peaks.append(peak)

        if args.num_workers and epoch + 1 < args.epochs:
            epoch_batches.start(epoch + 1)  # the workers load the next epoch's first batches during evaluation
        eval_start = time.time()
        test_stats = evaluate_all(args, loader_val, model_without_ddp, model_ema, device, amp_dtype)
        log.update(test_stats)
        log['eval_time_s'] = time.time() - eval_start
        log['n_parameters'] = n_parameters
        print(f'Accuracy of the network on the {test_stats["test_images"]} test images: '
              f'{test_stats["test_acc1"]:.2f}%')
        improved = test_stats['test_acc1'] > max_acc1
        max_acc1 = max(max_acc1, test_stats['test_acc1'])
        max_acc5 = max(max_acc5, test_stats['test_acc5'])
        print(f'Max accuracy: {max_acc1:.2f}%')
        history.append(log)
        done = epoch + 1 - state['start_epoch']  # epochs of this process, setup included in the first
        print(f'Epoch {epoch + 1}/{args.epochs} done; the run\'s ETA: '
              f'{utils.format_hms((time.time() - start_time) / done * (args.epochs - epoch - 1))}')

        if args.output_dir and utils.is_main_process():
            checkpoint = {
                'model': model_without_ddp.state_dict(),
                'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(),
                'epoch': epoch,
                'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
                'scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
                'max_acc1': max_acc1,
                'max_acc5': max_acc5,
                'elapsed_s': state['elapsed_s'] + time.time() - start_time,
                'max_peak_mem_mib': max(peaks) if peaks else None,
                'history': history,
                'resumes': state['resumes'],
                'args': vars(args),
            }
            save_epoch(args.output_dir, checkpoint, improved)

    total_time = state['elapsed_s'] + time.time() - start_time
    summary = make_summary(args, state, history, total_time=total_time, peaks=peaks, amp_dtype=amp_dtype,
                           model=model_without_ddp, n_parameters=n_parameters, fusion=fusion,
                           gpus=gpu_names(device), git=git)
    summary['param_checksums'] = rank_checksums(model_without_ddp, device)
    print('Training time', summary['total_time'])
    print(json.dumps({k: v for k, v in summary.items() if k != 'args'}, indent=2))
    if args.output_dir and utils.is_main_process():
        utils.atomic_write_json(summary, os.path.join(args.output_dir, 'summary.json'))
    return summary


if __name__ == '__main__':
    parser = ArgumentParser('main.py', description='Famba-V training and evaluation', parents=[get_args_parser()])
    cli_args = parser.parse_args()
    try:
        main(cli_args)
    except (UsageError, datasets.DataSetError, engine.NonFiniteLossError) as err:
        sys.exit(f'main.py: error: {err}')
    except KeyboardInterrupt:  # every file written so far is complete (atomic writes): the same command resumes
        print('main.py: interrupted', file=sys.stderr)
        sys.exit(130)
    if dist.is_initialized():  # leave together: a process exiting while a peer still talks to it can abort gloo
        dist.barrier()
        dist.destroy_process_group()
