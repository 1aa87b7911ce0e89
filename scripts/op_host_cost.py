"""Host microseconds per call of the torch ops and kernel wrappers an eager Vim-Ti step is made of, at its shapes:
each op is enqueued 200 times behind a GPU sleep, so that only the host's time counts (best of 3 loops). cuBLAS and
cuBLASLt are compared for the GEMMs (torch.backends.cuda.preferred_blas_library). On a CUDA machine:

    python3 scripts/op_host_cost.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import norm as norm_kernels  # noqa: E402

dev = "cuda"
B, L, E, DM = 128, 197, 384, 192


def host_us(fn, n=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        torch.cuda._sleep(300_000_000)   # the GPU stays busy: the loop measures enqueueing only
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


rows = []   # (dtype, BLAS library, op, host us per call)
for dt in (torch.bfloat16, torch.float32):
    k = 48 if dt == torch.bfloat16 else 44
    u = torch.randn(2, B * L, E, device=dev, dtype=dt)
    xw = torch.randn(2, k, E, device=dev, dtype=dt)
    h = torch.randn(B, L, DM, device=dev, dtype=dt)
    w_in = torch.randn(2 * E, DM, device=dev, dtype=dt)
    part = torch.randn(B, DM, E, device=dev, dtype=dt)
    dout = torch.randn(B, L, DM, device=dev, dtype=dt)
    out_z = torch.randn(B, L, E, device=dev, dtype=dt)
    tiny = torch.zeros(1, device=dev)
    name = str(dt).split(".")[1]
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        rows.append((name, lib, "bmm x_proj (2,BL,E)x(2,E,k)", host_us(lambda: torch.bmm(u, xw.transpose(1, 2)))))
        rows.append((name, lib, "linear in_proj", host_us(lambda: F.linear(h, w_in))))
        rows.append((name, lib, "bmm wgrad (B,DM,L)x(B,L,E)", host_us(lambda: torch.bmm(dout.mT, out_z))))
        rows.append((name, lib, "mm wgrad one GEMM K=BL",
                     host_us(lambda: dout.reshape(-1, DM).t() @ out_z.reshape(-1, E))))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows.append((name, lib, "linear in_proj under autocast", host_us(lambda: F.linear(h, w_in))))
    torch.backends.cuda.preferred_blas_library("cublas")
    rows.append((name, "-", "sum(0, dtype=f32) (B,DM,E)", host_us(lambda: part.sum(0, dtype=torch.float32))))
    rows.append((name, "-", "sum(0) (B,DM,E)", host_us(lambda: part.sum(0))))
    rows.append((name, "-", "empty (B,L,E)", host_us(lambda: torch.empty(B, L, E, device=dev, dtype=dt))))
    rows.append((name, "-", "view+slice", host_us(lambda: u.view(2, B, L, E)[..., :E // 2])))
    rows.append((name, "-", "add_ tiny", host_us(lambda: tiny.add_(1))))
    w = torch.ones(DM, device=dev)
    res = torch.randn(B, L, DM, device=dev)
    rows.append((name, "-", "add_norm_fwd (Triton, Launcher)",
                 host_us(lambda: norm_kernels.add_norm_fwd(h, res, w, None, 1e-5, dt))))

print("| dtype | blas | op | host us/call |\n| --- | --- | --- | --- |")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} |")
