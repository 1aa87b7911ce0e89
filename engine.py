"""Train one epoch / evaluate, DeiT-style.

The per-step work (forward, loss, backward, clipping, optimizer step) lives in the step object
built by ``build_train_step`` so that the same loop drives eager and CUDA-graph training. The loop
never reads the loss on every step: losses are summed on the device and read (one sync) every
``print_freq`` steps and at the end of the epoch, where finiteness is checked.
"""
import datetime
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# ---- train steps (lead) ----
def build_train_step(model, criterion, optimizer, *, amp_dtype, loss_scaler, clip_grad, cuda_graph):
    """Minimal eager stand-in with the final signature; replaced by the lead's implementation."""
    if cuda_graph:
        raise NotImplementedError('CUDA-graph training step is not available in this stand-in')

    def step(samples, targets):
        with torch.autocast(samples.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(samples), targets)
        scaled = loss_scaler.scale(loss) if loss_scaler is not None else loss
        scaled.backward()
        if loss_scaler is not None:
            loss_scaler.unscale_(optimizer)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if loss_scaler is not None:
            loss_scaler.step(optimizer)
            loss_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
# ---- end train steps ----


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite (and --if_continue_inf is off)."""


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _hms(seconds):
    return str(datetime.timedelta(seconds=int(round(seconds))))


def train_one_epoch(model, step, data_loader, optimizer, device, epoch, *, mixup_fn=None,
                    model_ema=None, print_freq=10, if_continue_inf=False, print_fn=print):
    """Run one epoch through ``step``; returns loss/lr/timing stats (global over all processes).

    Loss values are accumulated on the device as [sum of finite losses, #finite, #non-finite] and
    reduced over processes at every print point, so all ranks see the same numbers and stop together.
    """
    model.train()
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    num_steps = len(data_loader)
    lr = optimizer.param_groups[0]['lr']
    window = torch.zeros(3, dtype=torch.float64, device=device)
    loss_sum, n_finite, n_nonfinite = 0.0, 0, 0
    images = 0
    window_images, window_steps = 0, 0
    start = window_start = time.time()

    def flush(i):
        # One host sync: read (and reduce) the device-side window of losses.
        nonlocal loss_sum, n_finite, n_nonfinite, window_images, window_steps, window_start
        w = _all_reduce_sum(window.clone()).tolist()
        window.zero_()
        loss_sum += w[0]
        n_finite += int(w[1])
        n_nonfinite += int(w[2])
        if w[2] and not if_continue_inf:
            raise NonFiniteLossError(
                f'Loss is not finite (NaN/inf) in {int(w[2])} of the last {window_steps * world_size} '
                f'steps (epoch {epoch}, step {i + 1}/{num_steps}); stopping without saving this epoch. '
                'Lower --lr, set --clip-grad, or use --no_amp / --amp-dtype bfloat16; '
                '--if_continue_inf keeps training anyway.')
        now = time.time()
        elapsed = now - start
        eta = elapsed / (i + 1) * (num_steps - i - 1)
        window_loss = w[0] / w[1] if w[1] else float('nan')
        running = loss_sum / n_finite if n_finite else float('nan')
        print_fn(f'Epoch: [{epoch}] [{i + 1:>{len(str(num_steps))}}/{num_steps}]  '
                 f'loss: {window_loss:.4f} ({running:.4f})  lr: {lr:.6f}  '
                 f'img/s: {window_images / max(now - window_start, 1e-9):.1f}  eta: {_hms(eta)}'
                 + (f'  non-finite steps: {n_nonfinite}' if n_nonfinite else ''))
        window_images, window_steps, window_start = 0, 0, now

    i = -1
    for i, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        loss = step(samples, targets)
        finite = torch.isfinite(loss)
        window += torch.stack([torch.where(finite, loss.double(), 0.0), finite.double(), (~finite).double()])
        if model_ema is not None:
            model_ema.update(_unwrap(model))
        n = samples.shape[0] * world_size
        images += n
        window_images += n
        window_steps += 1
        if (i + 1) % print_freq == 0 or i + 1 == num_steps:
            flush(i)
    if window_steps:
        flush(i)
    elapsed = time.time() - start
    return {
        'loss': loss_sum / n_finite if n_finite else float('nan'),
        'lr': lr,
        'steps': i + 1,
        'nonfinite_steps': n_nonfinite,
        'images': images,
        'time_s': elapsed,
        'images_per_s': images / elapsed if elapsed > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(data_loader, model, device, *, amp_dtype=None, sync=False):
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the loader's images.

    With ``sync`` the per-process sums are added over all processes (the loader then holds this
    process's shard of the evaluation set); without it the numbers are this process's alone.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, target in data_loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        loss = torch.nn.functional.cross_entropy(output, target, reduction='sum')
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(target[:, None])
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(target.shape[0]), dtype=torch.float64, device=device)])
    if sync:
        _all_reduce_sum(totals)
    loss_sum, top1, top5, n = totals.tolist()
    if n == 0:
        raise ValueError('evaluation set is empty')
    return {'loss': loss_sum / n, 'acc1': 100.0 * top1 / n, 'acc5': 100.0 * top5 / n, 'images': int(n)}
