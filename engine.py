"""Train one epoch / evaluate, DeiT-style.

The per-step work (forward, loss, backward, gradient averaging over processes, clipping, optimizer step)
lives in the step object built by ``build_train_step``, so that the same loop drives the captured and the
eager step. The loop never reads the loss on every step: losses are summed on the device and read (one
sync) every ``print_freq`` steps and at the end of the epoch, where finiteness is checked.
"""
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils

CAPTURED_UPDATE_OPTS = ('adamw', 'adam')  # torch's fused AdamW/Adam take device learning rates and loss-scaling flags


def _forward_backward(model, criterion, samples, targets, amp_dtype, loss_scaler, autocast_cache=True):
    """Forward under autocast, loss, backward (of the scaled loss with fp16 loss scaling). Returns the unscaled
    loss, not synced."""
    with torch.autocast(samples.device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                        cache_enabled=autocast_cache):
        loss = criterion(model(samples), targets)
    (loss if loss_scaler is None else loss_scaler.scale(loss)).backward()
    return loss.detach()


def _update(params, optimizer, loss_scaler, clip_grad, skip_nonfinite=False):
    """Clipping and the optimizer step. With fp16 loss scaling the gradients are unscaled first where clipping
    needs them, the step is skipped when they hold inf/NaN, and the scale is updated. ``skip_nonfinite``
    (--if_continue_inf) skips such a step without loss scaling too, as Vim skips a step whose loss is not finite.
    It looks at the gradients, which every process holds averaged, so that all processes skip alike: on the device
    for torch's fused AdamW/Adam (their found_inf flag, as the loss scaler sets it), else by reading their norm.
    params: a list (it is read twice)."""
    if loss_scaler is not None and clip_grad is not None:
        loss_scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad is not None else None
    if loss_scaler is not None:
        loss_scaler.step(optimizer)
        loss_scaler.update()
    elif not skip_nonfinite:
        optimizer.step()
    else:
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = torch.isfinite(norm).logical_not().float()  # 0-dim, as the steps are
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif torch.isfinite(norm):  # one host sync per step
            optimizer.step()


class EagerTrainStep:
    """One training step op by op (under DistributedDataParallel when ``model`` is wrapped in it): for
    debugging, the CPU, and whatever cannot be captured."""

    def __init__(self, model, criterion, optimizer, amp_dtype, loss_scaler, clip_grad, skip_nonfinite=False):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.amp_dtype, self.loss_scaler, self.clip_grad = amp_dtype, loss_scaler, clip_grad
        self.skip_nonfinite = skip_nonfinite
        self.params = list(model.parameters())  # once, not a new list every step
        self.setup_s, self.setup_steps = 0.0, 0  # the first CUDA step: Triton compiles, cuDNN benchmarks

    def __call__(self, samples, targets):
        first = self.setup_steps == 0 and samples.is_cuda
        start = time.perf_counter()
        loss = _forward_backward(self.model, self.criterion, samples, targets, self.amp_dtype, self.loss_scaler)
        _update(self.params, self.optimizer, self.loss_scaler, self.clip_grad, self.skip_nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        if first:
            torch.cuda.synchronize()
            self.setup_s, self.setup_steps = time.perf_counter() - start, 1
        return loss


class CapturedTrainStep:
    """The training step as CUDA graphs, replayed: forward + loss + backward, then gradient averaging, clipping,
    the optimizer step and (fp16) the loss scaler's skip-and-update. One replay launches what takes thousands of
    launches eagerly, which is what turns fused tokens into saved time.

    Gradients live in one flat buffer (each ``p.grad`` a view of it) that the first graph zeroes and backward
    writes. With a process group, one all-reduce of that buffer runs between the two replays: the
    DistributedDataParallel gradient average as a single NCCL call, so several processes train captured too
    (``model`` must then not be wrapped in DDP, and must start equal on every process).

    Token fusion keeps every shape static (the per-layer token counts are fixed), so one capture serves the
    whole run. The first ``warmup`` calls run eagerly on the stream the capture uses (allocator, cuBLAS and
    Triton set-up happen outside the capture); their time is ``setup_s``. Inputs are copied into static
    buffers (the loader must drop the last, smaller batch).

    The update is captured as the second graph when the optimizer is a fused one that takes device learning
    rates (AdamW/Adam with fused=True, capturable=True: ``CAPTURED_UPDATE_OPTS``): the fused step reads fp16 loss
    scaling's inf flag on the device, and unlike the capturable foreach step it does not divide by the learning
    rate (which turns lr = 0 into NaN wherever a gradient has always been zero, as the last layer's
    forward-direction A_log with a head class token). The floats that the scheduler writes into
    ``optimizer.param_groups`` are copied into those device tensors before each replay. Any other optimizer
    takes its update (and the clipping and loss scaling around it) eagerly after the first graph's replay, as the
    eager step would: its few launches are enqueued while the GPU still runs the graph. ``capture=False`` runs
    the same parts eagerly (tests of the all-reduce path on the CPU).
    """

    def __init__(self, model, criterion, optimizer, amp_dtype, loss_scaler, clip_grad, process_group=None,
                 warmup=3, capture=True, skip_nonfinite=False):
        if isinstance(model, DistributedDataParallel):
            raise ValueError("the captured step averages gradients itself: pass the model without DDP")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.amp_dtype, self.loss_scaler, self.clip_grad = amp_dtype, loss_scaler, clip_grad
        self.skip_nonfinite = skip_nonfinite
        self.group, self.warmup, self.capture = process_group, warmup, capture
        self.capture_update = capture and all(g.get("capturable") and g.get("fused") for g in optimizer.param_groups)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len({(p.dtype, p.device) for p in self.params}) != 1:
            raise ValueError("the captured step keeps all gradients in one buffer: parameters of one dtype and device")
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                                     device=self.params[0].device)
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.calls, self.static, self.graphs = 0, None, None
        self.setup_s, self.setup_steps = 0.0, 0
        self.stream = torch.cuda.Stream() if capture else None  # warm-up and capture share it

    def _forward_backward(self):
        self.flat_grad.zero_()  # backward then accumulates into zeros: the gradient views stay in place
        samples, targets = self.static
        return _forward_backward(self.model, self.criterion, samples, targets, self.amp_dtype, self.loss_scaler,
                                 autocast_cache=not self.capture)

    def _all_reduce(self):
        if self.group is not None:
            dist.all_reduce(self.flat_grad, group=self.group)

    def _update(self):
        if self.group is not None:
            self.flat_grad.div_(dist.get_world_size(self.group))
        _update(self.params, self.optimizer, self.loss_scaler, self.clip_grad, self.skip_nonfinite)

    def _eager(self):
        loss = self._forward_backward()
        self._all_reduce()
        self._update()
        return loss

    def __call__(self, samples, targets):
        if self.static is None:
            self.static = (torch.empty_like(samples), torch.empty_like(targets))
        if samples.shape != self.static[0].shape or targets.shape != self.static[1].shape:
            raise ValueError(f"the captured step was built for inputs {tuple(self.static[0].shape)} / "
                             f"{tuple(self.static[1].shape)}, got {tuple(samples.shape)} / {tuple(targets.shape)}; "
                             "use a loader with drop_last=True")
        self.static[0].copy_(samples, non_blocking=True)
        self.static[1].copy_(targets, non_blocking=True)
        if not self.capture:
            return self._eager()
        if self.graphs is not None:
            return self._replay()
        start = time.perf_counter()  # warm-up and capture: timed apart from the steady steps
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.calls < self.warmup:
                self.calls += 1
                loss = self._eager()
            else:
                self._capture()
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.graphs is not None:  # the capture recorded the step without running it: train this batch
            loss = self._replay()
        torch.cuda.synchronize()
        self.setup_s += time.perf_counter() - start
        self.setup_steps += 1
        return loss

    def _replay(self):
        forward_backward, update = self.graphs
        if update is not None:
            for group, lr in zip(self.optimizer.param_groups, self.lr_tensors):
                lr.fill_(group["lr"])
        forward_backward.replay()
        self._all_reduce()
        if update is None:
            self._update()
        else:
            update.replay()
        return self.loss

    def _capture(self):
        forward_backward, update = torch.cuda.CUDAGraph(), None
        # thread_local: the data loader's pin-memory thread keeps allocating pinned host memory, which a
        # global-mode capture counts as an unsafe call from any thread and aborts on
        with torch.cuda.graph(forward_backward, stream=self.stream, capture_error_mode="thread_local"):
            self.loss = self._forward_backward()
        if self.capture_update:
            groups = self.optimizer.param_groups
            self.lr_tensors = [torch.tensor(float(g["lr"]), device=self.flat_grad.device) for g in groups]
            floats = [g["lr"] for g in groups]
            for group, lr in zip(groups, self.lr_tensors):
                group["lr"] = lr
            update = torch.cuda.CUDAGraph()
            with torch.cuda.graph(update, pool=forward_backward.pool(), stream=self.stream,
                                  capture_error_mode="thread_local"):
                self._update()
            for group, lr in zip(groups, floats):
                group["lr"] = lr
        self.graphs = forward_backward, update
        self.capture_peak_bytes = torch.cuda.max_memory_allocated()  # the graphs' pool, as main.py logs it


def build_train_step(model, criterion, optimizer, *, amp_dtype, loss_scaler, clip_grad, cuda_graph,
                     process_group=None, skip_nonfinite=False):
    """step(samples, targets) -> loss: one optimisation step, captured (``cuda_graph``; gradients averaged over
    ``process_group`` if given) or eager (``model`` wrapped in DDP for several processes). ``skip_nonfinite``:
    a step whose gradients are not finite changes nothing (--if_continue_inf; see _update)."""
    if cuda_graph:
        return CapturedTrainStep(model, criterion, optimizer, amp_dtype, loss_scaler, clip_grad, process_group,
                                 skip_nonfinite=skip_nonfinite)
    return EagerTrainStep(model, criterion, optimizer, amp_dtype, loss_scaler, clip_grad, skip_nonfinite)


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite (and --if_continue_inf is off)."""


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


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
              f'img/s: {window_images / max(now - window_start, 1e-9):.1f}  eta: {utils.format_hms(eta)}'
              + (f'  non-finite steps: {n_nonfinite}' if n_nonfinite else ''), flush=True)
        window_images, window_steps, window_start = 0, 0, now

    setup_s, setup_steps = getattr(step, 'setup_s', 0.0), getattr(step, 'setup_steps', 0)
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
    # The first steps' Triton compiles and graph capture are reported apart, so that epoch times compare.
    setup_s = getattr(step, 'setup_s', 0.0) - setup_s
    setup_images = (getattr(step, 'setup_steps', 0) - setup_steps) * (images // max(i + 1, 1))
    elapsed = time.time() - start - setup_s
    return {
        'loss': loss_sum / n_finite if n_finite else float('nan'),
        'lr': optimizer.param_groups[0]['lr'],
        'steps': i + 1,
        'nonfinite_steps': n_nonfinite,
        'images': images,
        'time_s': elapsed,
        'setup_time_s': setup_s,
        'images_per_s': (images - setup_images) / elapsed if elapsed > 0 else 0.0,
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
