"""Host microseconds per call of the torch ops and kernel wrappers an eager Vim-Ti step is made of, at its shapes,
called from Python and, for the torch ops, from C++ (an extension built here with torch.utils.cpp_extension, which
runs the same ATen call in a loop): each op is enqueued 200 times behind a GPU sleep, so that only the host's time
counts (best of 3 loops). cuBLAS and cuBLASLt are compared for the GEMMs (torch.backends.cuda.preferred_blas_library).
The C++ column is what the eager step's torch calls would cost if the per-layer sequence left Python; it needs a
C++ compiler and ninja (without them the column says so). On a CUDA machine:

    python3 scripts/op_host_cost.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import norm as norm_kernels  # noqa: E402

B, L, E, DM = 128, 197, 384, 192

# Each op loops n times in C++ on the tensors it is given, as the Python lambdas below call it once.
CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
using at::Tensor;
#define REPEAT(body) for (int64_t i = 0; i < n; ++i) { body; }
void bmm_x_proj(const Tensor& u, const Tensor& w, int64_t n) { REPEAT(at::bmm(u, w.transpose(1, 2))) }
void linear(const Tensor& h, const Tensor& w, int64_t n) { REPEAT(at::linear(h, w)) }
void bmm_wgrad(const Tensor& d, const Tensor& z, int64_t n) { REPEAT(at::bmm(d.mT(), z)) }
void mm_wgrad(const Tensor& d, const Tensor& z, int64_t n) {
  REPEAT(at::matmul(d.reshape({-1, d.size(-1)}).t(), z.reshape({-1, z.size(-1)}))) }
void sum0_f32(const Tensor& t, int64_t n) { REPEAT(t.sum(0, false, at::kFloat)) }
void sum0(const Tensor& t, int64_t n) { REPEAT(t.sum(0)) }
void empty(const Tensor& like, int64_t n) { REPEAT(at::empty(like.sizes(), like.options())) }
void view_slice(const Tensor& u, int64_t b, int64_t l, int64_t n) {
  REPEAT(u.view({2, b, l, u.size(-1)}).slice(-1, 0, u.size(-1) / 2)) }
void add_(Tensor t, int64_t n) { REPEAT(t.add_(1)) }
TORCH_LIBRARY(op_host_cost, m) {
  m.def("bmm_x_proj", bmm_x_proj); m.def("linear", linear); m.def("bmm_wgrad", bmm_wgrad);
  m.def("mm_wgrad", mm_wgrad); m.def("sum0_f32", sum0_f32); m.def("sum0", sum0); m.def("empty", empty);
  m.def("view_slice", view_slice); m.def("add_", add_);
}
"""


def build_cpp():
    """The C++ loops as torch.ops.op_host_cost, or the reason they could not be built."""
    from torch.utils.cpp_extension import load_inline
    try:
        load_inline("op_host_cost", CPP_SOURCE, is_python_module=False, extra_cflags=["-O2"])
    except Exception as e:   # no compiler or ninja here: the table keeps its Python column
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return torch.ops.op_host_cost


def host_us(run, n=200):
    """Host us per call of ``run(n)``, which enqueues n calls."""
    run(5)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        torch.cuda._sleep(300_000_000)   # the GPU stays busy: the loop measures enqueueing only
        t0 = time.perf_counter()
        run(n)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def python(fn):
    def run(n):
        for _ in range(n):
            fn()
    return run


def ops(dt, dev):
    """(name, Python call, C++ loop name, its tensor arguments) for one dtype; rows without C++ have None."""
    k = 48 if dt == torch.bfloat16 else 44
    u = torch.randn(2, B * L, E, device=dev, dtype=dt)
    xw = torch.randn(2, k, E, device=dev, dtype=dt)
    h = torch.randn(B, L, DM, device=dev, dtype=dt)
    w_in = torch.randn(2 * E, DM, device=dev, dtype=dt)
    w_grad = w_in.clone().requires_grad_()
    part = torch.randn(B, DM, E, device=dev, dtype=dt)
    dout = torch.randn(B, L, DM, device=dev, dtype=dt)
    out_z = torch.randn(B, L, E, device=dev, dtype=dt)
    tiny = torch.zeros(1, device=dev)
    like = torch.empty(B, L, E, device=dev, dtype=dt)
    w, res = torch.ones(DM, device=dev), torch.randn(B, L, DM, device=dev)
    gemms = [
        ("bmm x_proj (2,BL,E)x(2,E,k)", lambda: torch.bmm(u, xw.transpose(1, 2)), "bmm_x_proj", (u, xw)),
        ("linear in_proj", lambda: F.linear(h, w_in), "linear", (h, w_in)),
        ("linear in_proj, weight requires grad", lambda: F.linear(h, w_grad), "linear", (h, w_grad)),
        ("bmm wgrad (B,DM,L)x(B,L,E)", lambda: torch.bmm(dout.mT, out_z), "bmm_wgrad", (dout, out_z)),
        ("mm wgrad one GEMM K=BL", lambda: dout.reshape(-1, DM).t() @ out_z.reshape(-1, E), "mm_wgrad",
         (dout, out_z)),
    ]
    others = [
        ("sum(0, dtype=f32) (B,DM,E)", lambda: part.sum(0, dtype=torch.float32), "sum0_f32", (part,)),
        ("sum(0) (B,DM,E)", lambda: part.sum(0), "sum0", (part,)),
        ("empty (B,L,E)", lambda: torch.empty(B, L, E, device=dev, dtype=dt), "empty", (like,)),
        ("view+slice", lambda: u.view(2, B, L, E)[..., :E // 2], "view_slice", (u, B, L)),
        ("add_ tiny", lambda: tiny.add_(1), "add_", (tiny,)),
        ("add_norm_fwd (Triton, Launcher)", lambda: norm_kernels.add_norm_fwd(h, res, w, None, 1e-5, dt), None, ()),
    ]
    return gemms, others


def measure(cpp, row):
    name, fn, cpp_name, args = row
    py_us = host_us(python(fn))
    if cpp_name is None or isinstance(cpp, str):
        return name, py_us, None
    loop = getattr(cpp, cpp_name)
    return name, py_us, host_us(lambda n: loop(*args, n))


def main():
    dev = "cuda"
    cpp = build_cpp()
    rows = []   # (dtype, BLAS library, op, Python us, C++ us or None)
    for dt in (torch.bfloat16, torch.float32):
        dname = str(dt).split(".")[1]
        gemms, others = ops(dt, dev)
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            rows += [(dname, lib, *measure(cpp, r)) for r in gemms]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                rows.append((dname, lib, *measure(cpp, ("linear in_proj under autocast",) + gemms[1][1:])))
        torch.backends.cuda.preferred_blas_library("cublas")
        rows += [(dname, "-", *measure(cpp, r)) for r in others]
    if isinstance(cpp, str):
        print(f"C++ loops not built: {cpp}")
    print("| dtype | blas | op | host us/call from Python | from C++ |\n| --- | --- | --- | --- | --- |")
    for dname, lib, name, py_us, cpp_us in rows:
        print(f"| {dname} | {lib} | {name} | {py_us:.1f} | {'-' if cpp_us is None else f'{cpp_us:.1f}'} |")


if __name__ == "__main__":
    main()
