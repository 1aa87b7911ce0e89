"""Host time of the eager training step (Vim-Ti, batch 128, 224 px): what a step costs the CPU to enqueue, how
many kernels it launches, and torch.profiler's self-CPU table. Where the eager step is bound by the host, this
says where the time goes.

    python scripts/host_profile.py STRATEGY LAYER TOKEN {fp32,bf16}      # e.g. all 0 7 bf16
"""
import argparse
import os
import statistics
import sys
import time

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402,F401
from engine import build_train_step  # noqa: E402


def eager_step(fusion, precision):
    """The eager Vim-Ti step as benchmark.py's eager mode builds it, warmed up, with its fixed batch: (step, x, y).
    fusion: the model's fusion_strategy / fusion_layer / fusion_token; precision: 'fp32' or 'bf16'."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = timm.create_model('vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2',
                              num_classes=100, drop_path_rate=0.0, **fusion).cuda()
    optimizer = create_optimizer_v2(model, opt='adamw', lr=5e-4, weight_decay=0.1, fused=True)  # as main.py
    step = build_train_step(model, SoftTargetCrossEntropy(), optimizer, loss_scaler=None, clip_grad=None,
                            amp_dtype={'fp32': None, 'bf16': torch.bfloat16}[precision], cuda_graph=False)
    x = torch.randn(128, 3, 224, 224, device='cuda')
    y = torch.randn(128, 100, device='cuda').softmax(-1)
    for _ in range(5):
        step(x, y)
    return step, x, y


def main(strategy, layer, token, precision):
    step, x, y = eager_step(dict(fusion_strategy=strategy, fusion_layer=int(layer), fusion_token=int(token)),
                            precision)
    enqueue = []
    for _ in range(10):  # from an idle GPU: the time until the step is enqueued is the host's
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y)
        enqueue.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step(x, y)
    torch.cuda.synchronize()
    print(f'{strategy} {layer} {token} {precision}: host enqueue ms median {statistics.median(enqueue) * 1e3:.1f}, '
          f'wall per step {(time.perf_counter() - start) * 100:.1f}')
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
    table = prof.key_averages()
    launches = sum(e.count for e in table if 'LaunchKernel' in e.key or 'cuLaunch' in e.key) / 3
    print(f'kernel launches per step: {launches:.0f}')
    print(table.table(sort_by='self_cpu_time_total', row_limit=40, max_name_column_width=70))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('strategy')
    parser.add_argument('layer')
    parser.add_argument('token')
    parser.add_argument('precision', choices=['fp32', 'bf16'])
    a = parser.parse_args()
    main(a.strategy, a.layer, a.token, a.precision)
