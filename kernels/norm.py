"""The residual add and RMSNorm in front of every Vim layer, one pass each way (models_mamba.add_norm):

    residual' = residual + scale[b] * hidden        (hidden itself without a residual; scale: drop path, or 1)
    normed    = residual' / sqrt(mean_c(residual'^2) + eps) * weight

In torch that is a drop-path multiply, an add, the norm and a cast forward, and as many kernels backward plus the
accumulation of the residual stream's two gradients; each direction here reads and writes every row once. The
weight's gradient is summed per program and then over the programs (no atomics: deterministic). The reference is
models_mamba.add_norm's torch path, which tests compare with these kernels.
"""
import torch
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv, row_block


@triton.jit
def _add_norm_fwd_kernel(h_ptr, r_ptr, scale_ptr, w_ptr, res_ptr, out_ptr, rstd_ptr, N, T, C, eps,
                         HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < N
    c = tl.arange(0, BLOCK)
    m = live[:, None] & (c < C)[None, :]
    at = row.to(tl.int64)[:, None] * C + c[None, :]
    x = tl.load(h_ptr + at, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x *= tl.load(scale_ptr + row // T, mask=live, other=0.0)[:, None]
    if HAS_RES:
        x += tl.load(r_ptr + at, mask=m, other=0.0).to(tl.float32)
    x = x.to(res_ptr.dtype.element_ty)   # the stream as stored is what the norm reads
    tl.store(res_ptr + at, x, mask=m)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / C + eps)
    tl.store(rstd_ptr + row, rstd, mask=live)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_norm_bwd_kernel(dout_ptr, dres_ptr, x_ptr, rstd_ptr, w_ptr, scale_ptr, dr_ptr, dh_ptr, dw_ptr, N, T, C,
                         ROWS_PER_PROGRAM, HAS_DRES: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    cm = c < C
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for start in range(first, first + ROWS_PER_PROGRAM, ROWS):
        row = start + tl.arange(0, ROWS)
        live = row < N
        m = live[:, None] & cm[None, :]
        at = row.to(tl.int64)[:, None] * C + c[None, :]
        rstd = tl.load(rstd_ptr + row, mask=live, other=0.0)[:, None]
        xhat = tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32) * rstd
        dout = tl.load(dout_ptr + at, mask=m, other=0.0).to(tl.float32)
        dw += tl.sum(dout * xhat, 0)
        g = dout * w[None, :]
        dx = rstd * (g - xhat * (tl.sum(g * xhat, 1) / C)[:, None])
        if HAS_DRES:
            dx += tl.load(dres_ptr + at, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            tl.store(dr_ptr + at, dx.to(dr_ptr.dtype.element_ty), mask=m)
        if HAS_SCALE:
            dx *= tl.load(scale_ptr + row // T, mask=live, other=0.0)[:, None]
        tl.store(dh_ptr + at, dx.to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid * C + c, dw, mask=cm)


_add_norm_fwd, _add_norm_bwd = Launcher(_add_norm_fwd_kernel), Launcher(_add_norm_bwd_kernel)
# H200, batch 128 x 197 tokens, bfloat16 hidden: forward 14.5 / 29.8 us at 192 / 384 channels with 4 rows and
# BLOCK / 128 warps per program; backward 32.0 / 52.1 us with 16 programs per SM, 8 rows per step and BLOCK / 256
# warps, against 45.1 / 71.6 with 4 programs, 4 rows and BLOCK / 128 warps (results/add_norm_tuning_h200.txt)
FWD_ROWS = 4            # rows per program forward
BWD_ROWS = 8            # rows per step of a backward program
PROGRAMS_PER_SM = 16    # backward programs, each summing its rows' part of the weight's gradient
_sm_count = {}


def _programs(device, rows):
    """Backward programs for ``rows`` rows: PROGRAMS_PER_SM per SM (4 in Triton's interpreter), at most one per step."""
    if device.type != "cuda":
        return 4
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return min(PROGRAMS_PER_SM * _sm_count[device], cdiv(rows, BWD_ROWS))


def add_norm_fwd(hidden, residual, weight, scale, eps, out_dtype):
    """hidden (B, T, C), residual (B, T, C) or None, weight (C,), scale (B,) float32 or None -> (normed in
    ``out_dtype``, residual' in the dtype hidden + residual promote to, rstd (B*T,) float32)."""
    hidden = hidden.contiguous()
    b, t, c = hidden.shape
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != hidden.shape:
            raise ValueError(f"residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    res = torch.empty_like(hidden, dtype=hidden.dtype if residual is None else
                           torch.promote_types(hidden.dtype, residual.dtype))
    out = torch.empty_like(hidden, dtype=out_dtype)
    rstd = torch.empty(b * t, device=hidden.device, dtype=torch.float32)
    _add_norm_fwd[(cdiv(b * t, FWD_ROWS),)](
        hidden, hidden if residual is None else residual, hidden if scale is None else scale, weight, res, out,
        rstd, b * t, t, c, eps, HAS_RES=residual is not None, HAS_SCALE=scale is not None, ROWS=FWD_ROWS,
        **row_block(c, 128))
    return out, res, rstd


def add_norm_bwd(dout, dres, res, rstd, weight, scale, has_residual, hidden_dtype):
    """Gradients of add_norm_fwd for its outputs' gradients dout (normed's) and dres (residual''s, or None):
    -> (hidden's in ``hidden_dtype``, residual's in res's dtype or None without a residual, weight's, summed in
    float32)."""
    dout = dout.contiguous()
    b, t, c = dout.shape
    n = b * t
    programs = _programs(dout.device, n)
    per_program = cdiv(n, programs * BWD_ROWS) * BWD_ROWS
    programs = cdiv(n, per_program)
    dres = None if dres is None else dres.contiguous()
    dr = torch.empty_like(res) if has_residual else None
    dh = torch.empty_like(dout, dtype=hidden_dtype)
    dw = torch.empty(programs, c, device=dout.device, dtype=torch.float32)
    _add_norm_bwd[(programs,)](
        dout, dout if dres is None else dres, res, rstd, weight, dout if scale is None else scale,
        dh if dr is None else dr, dh, dw, n, t, c, per_program, HAS_DRES=dres is not None, HAS_RES=has_residual,
        HAS_SCALE=scale is not None, ROWS=BWD_ROWS, **row_block(c, 256))
    return dh, dr, dw.sum(0).to(weight.dtype)
