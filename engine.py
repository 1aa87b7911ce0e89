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


def _forward_backward_step(model, criterion, optimizer, samples, targets, amp_dtype, loss_scaler, clip_grad,
                           autocast_cache=True):
    """Forward under autocast, loss, backward, clipping, optimizer step. Returns the (unsynced) loss."""
    with torch.autocast(samples.device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                        cache_enabled=autocast_cache):
        loss = criterion(model(samples), targets)
    if loss_scaler is not None:  # fp16: scale the loss, unscale before clipping; the scaler skips inf steps
        loss_scaler.scale(loss).backward()
        loss_scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if loss_scaler is not None:
        loss_scaler.step(optimizer)
        loss_scaler.update()
    else:
        optimizer.step()
    return loss.detach()


class CUDAGraphTrainStep:
    """The whole training step (forward, loss, backward, clipping, AdamW) captured once in a CUDA graph and
    replayed: one launch per step instead of thousands, which is what turns fused tokens into saved time.

    Token fusion keeps every shape static (the per-layer token counts are fixed), so one capture serves the
    whole run. The first ``warmup`` calls run eagerly on the stream the capture will use (allocator and
    cuBLAS set-up happen outside the capture). Inputs are copied into static buffers; the optimizer must be capturable, and
    the learning rates that the scheduler writes into ``optimizer.param_groups`` as floats are copied into the
    device tensors the graph reads before each replay. Needs a fixed batch shape (drop_last) and no loss scaler.
    """

    def __init__(self, model, criterion, optimizer, amp_dtype, clip_grad, warmup=3):
        if not all(g.get("capturable", False) or g.get("fused", False) for g in optimizer.param_groups):
            raise ValueError("a CUDA-graph training step needs an optimizer created with capturable=True")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.amp_dtype, self.clip_grad, self.warmup = amp_dtype, clip_grad, warmup
        self.calls, self.graph, self.static = 0, None, None
        self.stream = torch.cuda.Stream()  # warm-up and capture share it, and so its cuBLAS workspace

    def _step(self):
        samples, targets = self.static
        return _forward_backward_step(self.model, self.criterion, self.optimizer, samples, targets,
                                      self.amp_dtype, None, self.clip_grad, autocast_cache=False)

    def __call__(self, samples, targets):
        if self.static is None:
            self.static = (torch.empty_like(samples), torch.empty_like(targets))
        if samples.shape != self.static[0].shape or targets.shape != self.static[1].shape:
            raise ValueError(f"the CUDA-graph step was captured for inputs {tuple(self.static[0].shape)} / "
                             f"{tuple(self.static[1].shape)}, got {tuple(samples.shape)} / {tuple(targets.shape)}; "
                             "use a loader with drop_last=True")
        self.static[0].copy_(samples, non_blocking=True)
        self.static[1].copy_(targets, non_blocking=True)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = self._step()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.stream)
            return loss
        if self.graph is None:
            self._capture()
        for group, lr in zip(self.optimizer.param_groups, self.lr_tensors):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self.loss

    def _capture(self):
        groups = self.optimizer.param_groups
        self.lr_tensors = [torch.tensor(float(g["lr"]), device=self.static[0].device) for g in groups]
        floats = [g["lr"] for g in groups]
        for group, lr in zip(groups, self.lr_tensors):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the capture then writes, not accumulates
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread keeps allocating pinned host memory, which a
        # global-mode capture counts as an unsafe call from any thread and aborts on
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            self.loss = self._step()
        self.capture_peak_bytes = torch.cuda.max_memory_allocated()  # the graph's pool, as main.py logs it
        for group, lr in zip(groups, floats):
            group["lr"] = lr


def build_train_step(model, criterion, optimizer, *, amp_dtype, loss_scaler, clip_grad, cuda_graph):
    """step(samples, targets) -> loss: one optimisation step, eager or as a replayed CUDA graph."""
    if cuda_graph:
        if loss_scaler is not None:
            raise ValueError("--cuda-graph cannot capture fp16 loss scaling: use --no_amp or --amp-dtype bfloat16")
        return CUDAGraphTrainStep(model, criterion, optimizer, amp_dtype, clip_grad)

    def step(samples, targets):
        loss = _forward_backward_step(model, criterion, optimizer, samples, targets, amp_dtype, loss_scaler,
                                      clip_grad)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


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


def _precision_advice(amp_dtype):
    if amp_dtype is None:  # already fp32: nothing to switch off
        return ''
    if amp_dtype == torch.float16:
        return ', or train with --no_amp (fp32) or --amp-dtype bfloat16'
    return ', or train with --no_amp (fp32)'


def train_one_epoch(model, step, data_loader, optimizer, device, epoch, *, mixup_fn=None,
                    model_ema=None, print_freq=10, if_continue_inf=False, lr_scheduler=None, amp_dtype=None):
    """Run one epoch through ``step``; returns loss/lr/timing stats (global over all processes).

    Loss values are accumulated on the device as [sum of finite losses, #finite, #non-finite] and
    reduced over processes at every print point, so all ranks see the same numbers and stop together.
    ``amp_dtype`` (the autocast dtype the step uses, None for fp32) only shapes the advice of the
    non-finite-loss error.
    """
    model.train()
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    num_steps = len(data_loader)
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
                f'Lower --lr (a --resume takes the new value), set --clip-grad{_precision_advice(amp_dtype)}; '
                '--if_continue_inf keeps training anyway.')
        now = time.time()
        elapsed = now - start
        eta = elapsed / (i + 1) * (num_steps - i - 1)
        window_loss = w[0] / w[1] if w[1] else float('nan')
        running = loss_sum / n_finite if n_finite else float('nan')
        print(f'Epoch: [{epoch}] [{i + 1:>{len(str(num_steps))}}/{num_steps}]  '
              f'loss: {window_loss:.4f} ({running:.4f})  lr: {optimizer.param_groups[0]["lr"]:.6f}  '
              f'img/s: {window_images / max(now - window_start, 1e-9):.1f}  eta: {_hms(eta)}'
              + (f'  non-finite steps: {n_nonfinite}' if n_nonfinite else ''), flush=True)
        window_images, window_steps, window_start = 0, 0, now

    i = -1
    for i, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        loss = step(samples, targets)
        if lr_scheduler is not None:  # --sched-on-updates
            lr_scheduler.step_update(epoch * num_steps + i + 1)
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
    elapsed = time.time() - start
    return {
        'loss': loss_sum / n_finite if n_finite else float('nan'),
        'lr': optimizer.param_groups[0]['lr'],
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
