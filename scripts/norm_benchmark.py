"""GPU time of the residual add + RMSNorm in front of a Vim layer, forward and backward (batch 128, 197 tokens,
Vim-Ti's and Vim-S's widths, a float32 or bfloat16 hidden stream and a float32 residual): the torch ops
(drop path, add, rms_norm, cast, and autograd's accumulation of the residual's two gradients) against
kernels/norm.py at 4, 16 and 64 backward programs per SM, drop path off and on. Microseconds of kernel time per
call, summed from torch.profiler's CUDA events over 20 calls (so without the launches' host time).

    python scripts/norm_benchmark.py
"""
import argparse
import os
import sys

import torch
from timm.layers import DropPath
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402
from kernels import norm as kn  # noqa: E402


def gpu_us(fn, calls=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / calls


def main():
    default = kn.PROGRAMS_PER_SM
    for c in (192, 384):
        for dtype in (torch.float32, torch.bfloat16):
            norm = models_mamba.RMSNorm(c).cuda()
            h = torch.randn(128, 197, c, device="cuda", dtype=dtype, requires_grad=True)
            r = torch.randn(128, 197, c, device="cuda", requires_grad=True)
            dh = torch.randn(128, 197, c, device="cuda", dtype=dtype)
            dr = torch.randn(128, 197, c, device="cuda")
            row = []
            for p in (0.0, 0.1):
                drop = DropPath(p) if p else torch.nn.Identity()

                def torch_ops():
                    res = r + drop(h)
                    torch.autograd.backward([norm(res).to(dtype), res], [dh, dr])
                row.append(f"torch dp{p} {gpu_us(torch_ops):.1f}")
                for programs in (4, 16, 64):
                    kn.PROGRAMS_PER_SM = programs

                    def kernels():
                        out, res = models_mamba._AddNorm.apply(h, r, norm.weight, models_mamba._drop_scale(drop, h),
                                                               norm.eps, dtype)
                        torch.autograd.backward([out, res], [dh, dr])
                    row.append(f"kernel dp{p} pps{programs} {gpu_us(kernels):.1f}")
            kn.PROGRAMS_PER_SM = default
            print(f"C {c} hidden {str(dtype)[6:]}: " + "; ".join(row) + " us")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
