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
CAPTURABLE_OPTS = ('adamw', 'adam')  # torch's fused AdamW/Adam take device learning rates and loss-scaling flags


class UsageError(Exception):
    """Flags, model settings or checkpoints that cannot work together; reported without a traceback."""


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
                        help='mixer kernels: triton (kernels_triton.py), cuda (mamba-ssm + causal-conv1d), '
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
    parser.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
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
    parser.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    parser.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau schedule')
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

    # Precision and speed
    parser.add_argument('--if_amp', action='store_true', help='automatic mixed precision (default)')
    parser.add_argument('--no_amp', action='store_false', dest='if_amp', help='train in fp32')
    parser.set_defaults(if_amp=True)
    parser.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                        help='autocast dtype; float16 uses loss scaling')
    parser.add_argument('--if_continue_inf', action='store_true', default=False,
                        help='keep training when the loss is NaN/inf instead of stopping')
    parser.add_argument('--cuda-graph', action=argparse.BooleanOptionalAction, default=None,
                        help='train with the step captured in CUDA graphs (default on CUDA with AdamW/Adam; '
                             '--no-cuda-graph: the eager step, op by op)')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls/convolutions on CUDA')
    return parser


def check_args(args):
    """Reject combinations that cannot work, before anything is built."""
    if args.batch_size < 1 or args.epochs < 0 or args.print_freq < 1:
        raise UsageError('--batch-size and --print-freq must be >= 1 and --epochs >= 0')
    use_cuda = args.device.startswith('cuda')
    if args.cuda_graph:
        if args.opt.lower() not in CAPTURABLE_OPTS:
            raise UsageError(f'--cuda-graph needs an optimizer that takes its learning rate on the device '
                             f'({", ".join(CAPTURABLE_OPTS)}), got --opt {args.opt}; use --no-cuda-graph')
        if not use_cuda:
            raise UsageError('--cuda-graph needs --device cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device} was asked for but CUDA is not available; use --device cpu')
    if args.eval and not args.resume:
        raise UsageError('--eval needs --resume CHECKPOINT (the model to evaluate)')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.mixup_mode in ('batch', 'pair') and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix in {args.mixup_mode} mode needs an even --batch-size, got {args.batch_size}')


def resolve_cuda_graph(args):
    """--cuda-graph unset: the captured step wherever it can run, with a notice where it cannot."""
    if args.cuda_graph is None:
        args.cuda_graph = args.device.startswith('cuda') and args.opt.lower() in CAPTURABLE_OPTS
        if args.device.startswith('cuda') and not args.cuda_graph:
            print(f'Note: training with the eager step: --opt {args.opt} cannot be captured in a CUDA graph '
                  f'(its learning rate is not a device tensor); {", ".join(CAPTURABLE_OPTS)} can')


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
    if args.distributed:
        if args.repeated_aug:
            sampler_train = samplers.RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                               seed=args.seed)
        else:
            sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                                shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train)
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
        persistent_workers=persist)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), num_workers=args.num_workers,
        pin_memory=pin, drop_last=False, persistent_workers=persist)
    if len(loader_train) == 0:
        raise UsageError(f'the training set ({len(dataset_train)} images over {world} process(es)) is smaller '
                         f'than one batch of {args.batch_size}')
    return sampler_train, loader_train, loader_val


def evaluate_all(args, loader_val, model_without_ddp, model_ema, device, amp_dtype):
    sync = args.distributed and args.dist_eval
    stats = {f'test_{k}': v for k, v in engine.evaluate(loader_val, model_without_ddp, device,
                                                         amp_dtype=amp_dtype, sync=sync).items()}
    if model_ema is not None and next(model_ema.module.parameters()).device.type == device.type:  # cuda:0 vs cuda
        ema = engine.evaluate(loader_val, model_ema.module, device, amp_dtype=amp_dtype, sync=sync)
        stats.update({f'test_ema_{k}': v for k, v in ema.items()})
    return stats


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    resolve_cuda_graph(args)
    print(args)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as DeiT: the patch-embedding conv gets cuDNN's fastest algorithm
    if device.type == 'cuda' and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # same seed on every process for the model; data/augmentation seeds differ per process and epoch
    utils.seed_everything(args.seed)
    dataset_train, nb_classes = datasets.build_dataset(True, args)
    dataset_val, _ = datasets.build_dataset(False, args)
    sampler_train, loader_train, loader_val = build_loaders(args, dataset_train, dataset_val, device)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)

    print(f'Creating model: {args.model}')
    model = build_model(args, nb_classes)
    if args.finetune:
        checkpoint = torch.load(args.finetune, map_location='cpu', weights_only=False)
        state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
        try:
            utils.load_finetune_state(model, state, args.finetune_cls_position)
        except ValueError as e:
            raise UsageError(f'--finetune {args.finetune}: {e}') from e
        print(f'Loaded {args.finetune} for fine-tuning')
    model.to(device)
    model_without_ddp = model
    several = args.distributed and utils.get_world_size() > 1
    if several and not args.cuda_graph:  # the captured step averages gradients itself, in one all-reduce
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    fusion = model_without_ddp.fusion_summary()
    print(f'number of params: {n_parameters}')
    print(f'token fusion: {json.dumps(fusion)}')
    print(f'mixer kernels: {model_without_ddp.layers[0].mixer.kernels(torch.empty(0, device=device))}')

    # EMA after the DDP wrap: DDP has broadcast rank 0's weights, so every process starts the same EMA
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0
    opt_kwargs = optimizer_kwargs(cfg=args)
    if device.type == 'cuda' and args.opt.lower() in CAPTURABLE_OPTS:
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

    max_acc1 = max_acc5 = float('-inf')
    elapsed_before = 0.0
    peak_mem_before = None
    if args.resume:
        checkpoint = torch.load(args.resume, map_location='cpu', weights_only=False)
        try:
            model_without_ddp.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            raise UsageError(f'checkpoint {args.resume} does not fit the model: {e}') from e
        if not args.eval:
            optimizer.load_state_dict(checkpoint['optimizer'])
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            args.start_epoch = checkpoint['epoch'] + 1
            if loss_scaler is not None and checkpoint.get('scaler') is not None:
                loss_scaler.load_state_dict(checkpoint['scaler'])
            max_acc1, max_acc5 = checkpoint['max_acc1'], checkpoint['max_acc5']
            elapsed_before = checkpoint['elapsed_s']
            peak_mem_before = checkpoint.get('max_peak_mem_mib')
        if model_ema is not None:
            if checkpoint.get('model_ema') is None:
                raise UsageError(f'{args.resume} holds no EMA weights; resume with --no-model-ema')
            model_ema.module.load_state_dict(checkpoint['model_ema'])
        print(f'Resumed from {args.resume} (epoch {checkpoint["epoch"]})')

    if args.eval:
        stats = evaluate_all(args, loader_val, model_without_ddp, model_ema, device, amp_dtype)
        print(f'Accuracy of the network on the {stats["test_images"]} test images: {stats["test_acc1"]:.2f}%')
        print(json.dumps(stats))
        if args.output_dir and utils.is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            utils.atomic_write_json(stats, os.path.join(args.output_dir, 'eval.json'))
        return stats

    step = engine.build_train_step(model, criterion, optimizer, amp_dtype=amp_dtype, loss_scaler=loss_scaler,
                                   clip_grad=args.clip_grad, cuda_graph=args.cuda_graph,
                                   process_group=dist.group.WORLD if several and args.cuda_graph else None)
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)

    print(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    peaks = [] if peak_mem_before is None else [peak_mem_before]
    history = []
    for epoch in range(args.start_epoch, args.epochs):
        utils.seed_everything(args.seed, epoch, utils.get_rank())
        if hasattr(sampler_train, 'set_epoch'):
            sampler_train.set_epoch(epoch)
        lr_scheduler.step(epoch)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        train_stats = engine.train_one_epoch(model, step, loader_train, optimizer, device, epoch,
                                             mixup_fn=mixup_fn, model_ema=model_ema,
                                             print_freq=args.print_freq, if_continue_inf=args.if_continue_inf,
                                             lr_scheduler=lr_scheduler if args.sched_on_updates else None)
        log = {'epoch': epoch, 'train_loss': train_stats['loss'], 'train_lr': train_stats['lr'],
               'epoch_time_s': train_stats['time_s'], 'train_images_per_s': train_stats['images_per_s']}
        if train_stats['setup_time_s']:
            log['setup_time_s'] = train_stats['setup_time_s']  # first steps: Triton compiles, graph capture
        if train_stats['nonfinite_steps']:
            log['train_nonfinite_steps'] = train_stats['nonfinite_steps']
        if device.type == 'cuda':
            # A CUDA graph's private pool is allocated once, at capture: count it in every epoch.
            peak = max(torch.cuda.max_memory_allocated(device), getattr(step, 'capture_peak_bytes', 0)) / 2 ** 20
            log['train_peak_mem_mib'] = peak
            peaks.append(peak)

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
                'elapsed_s': elapsed_before + time.time() - start_time,
                'max_peak_mem_mib': max(peaks) if peaks else None,
                'args': vars(args),
            }
            utils.atomic_torch_save(checkpoint, os.path.join(args.output_dir, 'checkpoint.pth'))
            if improved:
                utils.atomic_torch_save(checkpoint, os.path.join(args.output_dir, 'best_checkpoint.pth'))
            utils.append_json_line(log, os.path.join(args.output_dir, 'log.txt'))

    total_time = elapsed_before + time.time() - start_time
    final = history[-1] if history else {}
    summary = {
        'model': args.model,
        'total_time_s': total_time,
        'total_time': utils.format_hms(total_time),
        'max_peak_mem_mib': max(peaks) if peaks else None,
        'best_acc1': max_acc1 if history or args.resume else None,
        'best_acc5': max_acc5 if history or args.resume else None,
        'final_acc1': final.get('test_acc1'),
        'final_acc5': final.get('test_acc5'),
        'final_ema_acc1': final.get('test_ema_acc1'),
        'epochs': args.epochs,
        'world_size': utils.get_world_size(),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'precision': str(amp_dtype).replace('torch.', '') if amp_dtype is not None else 'float32',
        'n_parameters': n_parameters,
        'fusion': fusion,
        'args': vars(args),
    }
    print('Training time', summary['total_time'])
    print(json.dumps({k: v for k, v in summary.items() if k != 'args'}, indent=2))
    if args.output_dir and utils.is_main_process():
        utils.atomic_write_json(summary, os.path.join(args.output_dir, 'summary.json'))
    return summary


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Famba-V training and evaluation script', parents=[get_args_parser()])
    cli_args = parser.parse_args()
    try:
        main(cli_args)
    except (UsageError, datasets.DataSetError, engine.NonFiniteLossError) as err:
        sys.exit(f'main.py: error: {err}')
