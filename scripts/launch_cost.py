"""Host time per call of the mixer's kernel wrappers and of one mixer (tiny shapes, so the GPU waits for the
host), then the eager Vim-Ti all r7 step (batch 128): wall time per step, enqueue time from an idle GPU, and
cProfile's 30 most expensive functions of three steps.

    python scripts/launch_cost.py {fp32,bf16}
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402
from engine import build_train_step  # noqa: E402
from kernels import conv as kconv, scan as kscan  # noqa: E402


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main(precision):
    r = lambda *s: torch.randn(*s, device='cuda')  # noqa: E731
    x = r(64)
    print(f"aten add_            {host_us(lambda: x.add_(0)):7.1f} us")
    print(f"torch.empty          {host_us(lambda: torch.empty(1, 32, 16, device='cuda')):7.1f} us")
    b, e, l, n = 1, 32, 16, 16
    u, delta, xz = r(2, b, l, e), r(2, b, l, e), r(b, l, 2 * e)
    BC, A = kscan.bc_rows(r(2, b, l, 2 * n)), (-torch.rand(2 * e, n, device='cuda')).t().contiguous().t()
    D, bias, g = r(2 * e), r(2 * e), r(b, l, e)
    y, _, states = kscan.scan_fwd(u, delta, BC, xz[..., e:], A, D, bias)
    dz = torch.empty_like(xz)[..., e:]
    print(f"scan_fwd wrapper     {host_us(lambda: kscan.scan_fwd(u, delta, BC, xz[..., e:], A, D, bias)):7.1f} us")
    print(f"scan_bwd wrapper     "
          f"{host_us(lambda: kscan.scan_bwd(u, delta, BC, xz[..., e:], A, D, bias, g, y, states, dz)):7.1f} us")
    w, cb = r(2 * e, 4), r(2 * e)
    print(f"conv_fwd wrapper     {host_us(lambda: kconv.conv_fwd(xz[..., :e], w, cb)):7.1f} us")
    mixer = models_mamba.BiMamba(16, backend='triton').cuda()  # E 32
    h = torch.randn(1, 16, 16, device='cuda', requires_grad=True)
    print(f"mixer fwd            {host_us(lambda: mixer(h)):7.1f} us")
    print(f"mixer fwd+bwd        {host_us(lambda: mixer(h).sum().backward()):7.1f} us")

    torch.manual_seed(0)
    model = timm.create_model('vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2',
                              num_classes=100, drop_path_rate=0.0, fusion_strategy='all', fusion_token=7).cuda()
    optimizer = create_optimizer_v2(model, opt='adamw', lr=5e-4, weight_decay=0.1, fused=True)  # as main.py
    step = build_train_step(model, SoftTargetCrossEntropy(), optimizer, loss_scaler=None, clip_grad=None,
                            amp_dtype={'bf16': torch.bfloat16, 'fp32': None}[precision], cuda_graph=False)
    images, targets = r(128, 3, 224, 224), r(128, 100).softmax(-1)
    print(f"eager {precision} all r7: {host_us(lambda: step(images, targets), n=15) / 1e3:.1f} ms/step wall")
    enqueue = []
    for _ in range(8):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(images, targets)
        enqueue.append(time.perf_counter() - start)
    print(f"enqueue ms median {statistics.median(enqueue) * 1e3:.1f}")
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(3):
        step(images, targets)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats('tottime').print_stats(30)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('precision', choices=['fp32', 'bf16'])
    main(parser.parse_args().precision)
