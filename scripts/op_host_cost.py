"""Host microseconds per call of the torch ops and kernel wrappers an eager Vim-Ti step is made of, at its shapes,
called from Python and, for the torch ops, from C++ (an extension built here with torch.utils.cpp_extension, which
runs the same ATen calls in a loop): each op is enqueued 200 times behind a GPU sleep, so that only the host's time
counts (best of 3 loops). cuBLAS and cuBLASLt are compared for the GEMMs (torch.backends.cuda.preferred_blas_library).
The last rows do the same for one mixer's forward and backward (ssm_ops.BiMambaTritonFn, 50 times) with its Triton
kernels' launches made no-ops, against their ATen calls from C++. The C++ column is what the eager step's torch
calls would cost if the per-layer sequence left Python; it needs a C++ compiler and ninja (without them the column
says so). On a CUDA machine:

    python3 scripts/op_host_cost.py
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402
import ssm_ops  # noqa: E402
from kernels import conv, launch, scan  # noqa: E402
from kernels import norm as norm_kernels  # noqa: E402

B, L, E, DM = 128, 197, 384, 192

# Each op loops n times in C++ on the tensors it is given, as the Python lambdas below call it once.
CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
using at::Tensor;
#define REPEAT(...) for (int64_t i = 0; i < n; ++i) { __VA_ARGS__; }
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

// BiMambaTritonFn's forward and backward (ssm_ops.py) as their ATen calls alone: the three Triton kernels' outputs
// are allocated as there, but nothing launches them.
void mixer_fwd(at::TensorList a, int64_t n) {
  const Tensor &xz = a[0], &conv_w = a[1], &conv_b = a[2], &x_proj_w = a[3], &dt_proj_w = a[4], &A = a[6],
      &half_out = a[8];
  int64_t b = xz.size(0), l = xz.size(1), e = xz.size(2) / 2, ns = A.size(1);
  auto f32 = xz.options().dtype(at::kFloat);
  REPEAT(
    auto x = xz.slice(-1, 0, e); conv_w.contiguous(); conv_b.contiguous();
    auto u = at::empty({2, b, l, e}, xz.options());
    auto x_dbl = at::bmm(u.view({2, b * l, e}), x_proj_w.transpose(1, 2));
    int64_t rank = x_dbl.size(-1) - 2 * ns;
    auto delta = at::bmm(x_dbl.slice(-1, 0, rank), dt_proj_w.transpose(1, 2)).view({2, b, l, e});
    auto BC = x_dbl.slice(-1, rank).view({2, b, l, 2 * ns});
    if (BC.scalar_type() != at::kFloat) BC = BC.to(at::kFloat, false, true, at::MemoryFormat::Contiguous);
    auto y = at::empty({b, l, e}, f32); auto out_z = at::empty({b, l, e}, xz.options());
    auto states = at::empty({b, 2, (l + 15) / 16 - 1, ns, e}, f32);
    at::linear(out_z, half_out))
}
void mixer_bwd(at::TensorList s, const Tensor& dout_in, int64_t g, int64_t n) {
  const Tensor &xz = s[0], &conv_w = s[1], &conv_b = s[2], &x_proj_w = s[3], &dt_proj_w = s[4], &dt_bias = s[5],
      &A = s[6], &D = s[7], &half_out = s[8], &x_dbl = s[9];
  int64_t b = xz.size(0), l = xz.size(1), e = xz.size(2) / 2, ns = A.size(1), k = x_dbl.size(-1);
  int64_t rank = k - 2 * ns, dm = dout_in.size(-1), blocks = e / 32, piece = xz.element_size() == 2 ? 8 : 16;
  int64_t p = b / g, gl = g * l;
  auto f32 = xz.options().dtype(at::kFloat);
  auto acc = at::promote_types(xz.scalar_type(), at::kFloat);
  REPEAT(
    auto x = xz.slice(-1, 0, e); conv_w.contiguous(); conv_b.contiguous();
    auto u = at::empty({2, b, l, e}, xz.options());
    auto delta = at::bmm(x_dbl.slice(-1, 0, rank), dt_proj_w.transpose(1, 2)).view({2, b, l, e});
    auto dout = dout_in.to(xz.scalar_type());
    auto dxz = at::empty_like(xz);
    auto dout_z = at::matmul(dout, half_out);
    auto du = at::empty_like(u); auto ddelta = at::empty({2, b, l, e}, delta.options());
    auto out_z = at::empty({b, l, e}, u.options()); auto dz = dxz.slice(-1, e);
    auto scratch = at::empty({b * 2 * blocks, piece, ns, 32}, f32);
    auto dparams = at::empty({b, ns + 2, 2 * e}, f32).sum(0);
    auto dbc = at::empty({2, blocks, b, l, 2 * ns}, f32);
    auto dA = dparams.slice(0, 0, ns).t().to(A.scalar_type()); auto dBC = dbc.sum(1);
    auto dD = dparams.select(0, ns).to(D.scalar_type());
    auto ddt_bias = dparams.select(0, ns + 1).to(dt_bias.scalar_type());
    auto dx_dbl = at::cat({at::bmm(ddelta.view({2, b * l, e}), dt_proj_w),
                           dBC.view({2, b * l, 2 * ns}).to(x_dbl.scalar_type())}, -1);
    auto dout_proj_w = at::bmm(dout.reshape({p, gl, dm}).mT(), out_z.reshape({p, gl, e})).sum(0, false, acc) * 0.5;
    auto ddt_proj_w = at::bmm(ddelta.reshape({2 * p, gl, e}).mT(), x_dbl.view({2 * p, gl, k}).slice(-1, 0, rank))
        .view({2, p, e, rank}).sum(1, false, acc);
    auto dx_proj_w = at::bmm(dx_dbl.view({2 * p, gl, k}).mT(), u.reshape({2 * p, gl, e}))
        .view({2, p, k, e}).sum(1, false, acc);
    du.view({2, b * l, e}).baddbmm_(dx_dbl, x_proj_w);
    conv_w.contiguous(); conv_b.contiguous();
    auto dwb = at::empty({b * ((l + 31) / 32), 2 * e, 5}, f32).sum(0);
    auto dconv_w = dwb.slice(1, 0, 4).to(conv_w.scalar_type());
    auto dconv_b = dwb.select(1, 4).to(conv_b.scalar_type()))
}
TORCH_LIBRARY(op_host_cost, m) {
  m.def("mixer_fwd", mixer_fwd); m.def("mixer_bwd", mixer_bwd);
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


class _Ctx:
    """What BiMambaTritonFn's forward and backward use of an autograd ctx."""
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _unlaunched():
    """Every compiled Triton kernel of the mixer (kernels/conv.py, kernels/scan.py) made a no-op launch: their
    wrappers still check, allocate and key as in a step, but launch nothing."""
    for module in (conv, scan):
        for launcher in vars(module).values():
            if isinstance(launcher, launch.Launcher):
                launcher.compiled = {key: (lambda grid, *args: None, constexprs)
                                     for key, (_, constexprs) in launcher.compiled.items()}


def mixer_rows(cpp, dev):
    """(dtype, op, Python us, C++ us) for one mixer's forward and backward at Vim-Ti's shapes without their kernel
    launches: ssm_ops.BiMambaTritonFn's own code against the same ATen calls from C++ (mixer_fwd, mixer_bwd)."""
    fn = ssm_ops.BiMambaTritonFn
    cases = []
    for dt in (torch.bfloat16, torch.float32):
        mixer = models_mamba.BiMamba(DM).to(dev)
        hidden = torch.randn(B, L, DM, device=dev)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
            conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, in_proj_w, out_proj_w, gemm = (
                models_mamba.stacked_params([mixer], hidden)[0])
            xz = F.linear(hidden.to(dt), in_proj_w.to(dt))
        args = (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, gemm)
        ctx, dout = _Ctx(), torch.randn(B, L, DM, device=dev, dtype=dt)
        with torch.no_grad():
            fn.forward(ctx, *args)
            fn.backward(ctx, dout)   # compiles every kernel the mixer launches
        cases.append((dt, args, ctx, dout))
    _unlaunched()
    rows = []
    for dt, args, ctx, dout in cases:
        saved, g = ctx.saved_tensors, ssm_ops._samples_per_gemm(B, L)
        with torch.no_grad():
            fwd = host_us(python(lambda: fn.forward(_Ctx(), *args)), n=50)
            bwd = host_us(python(lambda: fn.backward(ctx, dout)), n=50)
            # the C++ forward takes the GEMM operands as the Function's GEMMs use them
            fwd_args = list(args[:3]) + list(args[9][:2]) + list(args[5:8]) + [args[9][2]]
            fwd_cpp = bwd_cpp = None
            if not isinstance(cpp, str):
                fwd_cpp = host_us(lambda n: cpp.mixer_fwd(fwd_args, n), n=50)
                bwd_cpp = host_us(lambda n: cpp.mixer_bwd(list(saved), dout, g, n), n=50)
        name = str(dt).split(".")[1]
        rows += [(name, "mixer forward, no launches", fwd, fwd_cpp),
                 (name, "mixer backward, no launches", bwd, bwd_cpp)]
    return rows


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
    for dname, lib, name, py_us, cpp_us in rows + [(d, "-", *r) for d, *r in mixer_rows(cpp, dev)]:
        print(f"| {dname} | {lib} | {name} | {py_us:.1f} | {'-' if cpp_us is None else f'{cpp_us:.1f}'} |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
