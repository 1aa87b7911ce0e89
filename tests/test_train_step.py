"""The captured step's structure on the CPU, where its parts run without graphs: gradients in one flat buffer,
one all-reduce of it over the processes (gloo here, NCCL on GPUs), then clipping and AdamW.

The reference is independent of that code: one process taking one eager step on both processes' batches at
once (the gradient of the mean loss over 2B samples is the mean of the two per-process gradients), and torch's
DistributedDataParallel."""
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import engine
import models_mamba  # noqa: F401

MODEL = dict(model_name='vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2',
             depth=2, embed_dim=32, patch_size=8, img_size=32, num_classes=10, drop_path_rate=0.0,
             fusion_strategy='all', fusion_token=3, ssm_backend='torch')
STEPS, BATCH = 4, 4
LRS = [1e-2, 3e-2, 0.0, 2e-2]  # as a scheduler writes them into param_groups; lr 0 must freeze the weights
# AdamW is blind to the gradient's scale, and so is a clipped step: SGD without clipping sees the average's scale
OPTIMIZERS = {'sgd': (lambda params: torch.optim.SGD(params, lr=LRS[0], momentum=0.9), None),
              'adamw-clipped': (lambda params: torch.optim.AdamW(params, lr=LRS[0], weight_decay=0.05), 0.05)}


def make_model():
    torch.manual_seed(0)
    return timm.create_model(**MODEL)


def batches(world):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(world * BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (world * BATCH,), generator=g))
            for _ in range(STEPS)]


def train(step, model, optimizer, data, rows=slice(None)):
    """Parameters after each step; ``rows``: this process's part of every batch."""
    snapshots = []
    for lr, (x, y) in zip(LRS, data):
        for group in optimizer.param_groups:
            group['lr'] = lr
        step(x[rows], y[rows])
        snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return snapshots


def build(kind, opt, world=1):
    model = make_model()
    make_optimizer, clip = OPTIMIZERS[opt]
    optimizer = make_optimizer(model.parameters())
    criterion = torch.nn.CrossEntropyLoss()
    if kind == 'eager':
        step = engine.EagerTrainStep(model, criterion, optimizer, None, None, clip)
    elif kind == 'ddp':
        step = engine.EagerTrainStep(DistributedDataParallel(model), criterion, optimizer, None, None, clip)
    else:  # the captured step's parts, run eagerly
        step = engine.CapturedTrainStep(model, criterion, optimizer, None, None, clip,
                                        process_group=dist.group.WORLD if world > 1 else None, capture=False)
    return step, model, optimizer


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('opt', list(OPTIMIZERS))
def test_flat_gradient_step_equals_the_eager_step(opt, one_thread):
    data = batches(1)
    eager = train(*build('eager', opt), data)
    flat = train(*build('flat', opt), data)
    for a, b in zip(flat, eager):
        assert rel(a, b) < 1e-6
    assert torch.equal(flat[2], flat[1])  # lr 0 moves nothing (AdamW's weight decay is scaled by lr too)
    assert not torch.equal(flat[1], flat[0])


def _worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        data = batches(world)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        results[rank] = {(kind, opt): train(*build(kind, opt, world), data, rows)[-1]
                         for kind in ('flat', 'ddp') for opt in OPTIMIZERS}
    finally:
        dist.destroy_process_group()


def test_flat_all_reduce_over_two_processes_equals_one_process_on_both_batches(tmp_path, one_thread):
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / 'init'), results), nprocs=world)
        results = dict(results)
    initial = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    for opt in OPTIMIZERS:
        flat = results[0][('flat', opt)]
        reference = train(*build('eager', opt), batches(world))[-1]  # one process, both processes' samples
        assert torch.equal(flat, results[1][('flat', opt)])  # every rank applies the same averaged update
        # the reference sums one batch of 2B where the processes sum two of B: they round apart, and AdamW's
        # update of a gradient near zero is steered by that rounding, so it gets the 1e-3
        assert rel(flat, reference) < (1e-5 if opt == 'sgd' else 1e-3), opt
        assert rel(flat, results[0][('ddp', opt)]) < 1e-5, opt  # the same sums: DDP's average of the two
        assert rel(reference, initial) > 1e-3  # the steps moved the weights: the comparison says something
        one_rank = train(*build('eager', opt), [(x[:BATCH], y[:BATCH]) for x, y in batches(world)])[-1]
        assert rel(flat, one_rank) > 1e-3  # the other process's samples count


@pytest.mark.skipif(os.name != 'posix', reason='file:// rendezvous')
def test_captured_step_refuses_a_ddp_model_and_mixed_dtypes(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1)
    try:
        model = make_model()
        opt = torch.optim.AdamW(model.parameters())
        with pytest.raises(ValueError, match='without DDP'):
            engine.CapturedTrainStep(DistributedDataParallel(model), None, opt, None, None, None, capture=False)
    finally:
        dist.destroy_process_group()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match='one dtype'):
        engine.CapturedTrainStep(model, None, torch.optim.AdamW(model.parameters()), None, None, None, capture=False)
