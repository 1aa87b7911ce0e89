"""Vim's depthwise conv + SiLU for both scan directions, token-major, in one kernel (spec section 6).

x (Bt, L, E) with contiguous channels (the x half of in_proj's output, read in place); weight (2E, 4) and bias
(2E) hold direction 0 then direction 1; u (2, Bt, L, E), a direction per leading index. Direction 0 is causal,
direction 1 causal on the flipped sequence, which at the original positions is anti-causal:

    u[0, :, t, c] = SiLU(b_c     + sum_k w_{c,k}   x[t - 3 + k, c])        (zero padding)
    u[1, :, t, c] = SiLU(b_{E+c} + sum_k w_{E+c,k} x[t + 3 - k, c])
"""
import torch
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv

CONV_WIDTH = 4
CONV_CHANNELS, CONV_TOKENS = 32, 32


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, s_xb, s_xt, E: tl.constexpr, BD: tl.constexpr,
                     BL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BD + tl.arange(0, BD)      # output channel, both directions
    r = (tl.program_id(1) * BD) // E                   # direction
    e = c - r * E
    t = tl.program_id(2) * BL + tl.arange(0, BL)
    step = 1 - 2 * r                                   # +1: x[t - 3 + k]; -1: x[t + 3 - k]
    acc = tl.zeros([BL, BD], dtype=tl.float32) + tl.load(b_ptr + c).to(tl.float32)[None, :]
    for k in tl.static_range(4):
        pos = t + step * (k - 3)
        xk = tl.load(x_ptr + b * s_xb + pos[:, None] * s_xt + e[None, :], mask=((pos >= 0) & (pos < L))[:, None],
                     other=0.0)
        acc += tl.load(w_ptr + c * 4 + k).to(tl.float32)[None, :] * xk.to(tl.float32)
    row = (r * tl.num_programs(0) + b) * L
    tl.store(out_ptr + (row + t[:, None]) * E + e[None, :], (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty),
             mask=(t < L)[:, None])


_conv_fwd = Launcher(_conv_fwd_kernel)


@triton.jit
def _dpre(pre, dout_ptr, row, pos, e, L, E: tl.constexpr):
    """Gradient before SiLU at token positions pos (BL,), channels e, from the pre-activation; 0 off the sequence."""
    ok = ((pos >= 0) & (pos < L))[:, None]
    dout = tl.load(dout_ptr + (row + pos[:, None]) * E + e[None, :], mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    return tl.where(ok, dout * sig * (1.0 + pre * (1.0 - sig)), 0.0)


@triton.jit
def _conv_dir_bwd(p3, p2, p1, x0, f1, f2, f3, w_ptr, b_ptr, c, e, dout_ptr, row, t, step, L, E: tl.constexpr):
    """One direction's part of dx at t, and its weight and bias partial sums over these tokens. p* are x at
    the direction's past (t - 3 step .. t - step), f* at its future; the direction's outputs t + m step
    (m = 0..3) read x at t + m step - 3 step + k step."""
    w0 = tl.load(w_ptr + c * 4).to(tl.float32)[None, :]
    w1 = tl.load(w_ptr + c * 4 + 1).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + c * 4 + 2).to(tl.float32)[None, :]
    w3 = tl.load(w_ptr + c * 4 + 3).to(tl.float32)[None, :]
    bias = tl.load(b_ptr + c).to(tl.float32)[None, :]
    g0 = _dpre(bias + w0 * p3 + w1 * p2 + w2 * p1 + w3 * x0, dout_ptr, row, t, e, L, E)
    g1 = _dpre(bias + w0 * p2 + w1 * p1 + w2 * x0 + w3 * f1, dout_ptr, row, t + step, e, L, E)
    g2 = _dpre(bias + w0 * p1 + w1 * x0 + w2 * f1 + w3 * f2, dout_ptr, row, t + 2 * step, e, L, E)
    g3 = _dpre(bias + w0 * x0 + w1 * f1 + w2 * f2 + w3 * f3, dout_ptr, row, t + 3 * step, e, L, E)
    dx = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
    return dx, tl.sum(g0 * p3, 0), tl.sum(g0 * p2, 0), tl.sum(g0 * p1, 0), tl.sum(g0 * x0, 0), tl.sum(g0, 0)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dwb_ptr, L, s_xb, s_xt,
                     E: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.program_id(2) * BL + tl.arange(0, BL)
    x_row = x_ptr + b * s_xb + e[None, :]
    m3 = tl.load(x_row + (t - 3)[:, None] * s_xt, mask=((t >= 3) & (t - 3 < L))[:, None], other=0.0).to(tl.float32)
    m2 = tl.load(x_row + (t - 2)[:, None] * s_xt, mask=((t >= 2) & (t - 2 < L))[:, None], other=0.0).to(tl.float32)
    m1 = tl.load(x_row + (t - 1)[:, None] * s_xt, mask=((t >= 1) & (t - 1 < L))[:, None], other=0.0).to(tl.float32)
    x0 = tl.load(x_row + t[:, None] * s_xt, mask=(t < L)[:, None], other=0.0).to(tl.float32)
    p1 = tl.load(x_row + (t + 1)[:, None] * s_xt, mask=(t + 1 < L)[:, None], other=0.0).to(tl.float32)
    p2 = tl.load(x_row + (t + 2)[:, None] * s_xt, mask=(t + 2 < L)[:, None], other=0.0).to(tl.float32)
    p3 = tl.load(x_row + (t + 3)[:, None] * s_xt, mask=(t + 3 < L)[:, None], other=0.0).to(tl.float32)
    dx0, a0, a1, a2, a3, ab = _conv_dir_bwd(m3, m2, m1, x0, p1, p2, p3, w_ptr, b_ptr, e, e, dout_ptr, b * L, t, 1,
                                            L, E)
    dx1, c0, c1, c2, c3, cb = _conv_dir_bwd(p3, p2, p1, x0, m1, m2, m3, w_ptr, b_ptr, E + e, e, dout_ptr,
                                            (tl.num_programs(0) + b) * L, t, -1, L, E)
    tl.store(dx_ptr + b * s_xb + t[:, None] * s_xt + e[None, :], (dx0 + dx1).to(dx_ptr.dtype.element_ty),
             mask=(t < L)[:, None])
    # partial weight and bias gradients of this program (its batch row and tokens), both directions: per channel its
    # 4 weights' and then its bias's, so that one sum over the programs adds up both
    fwd = ((b * tl.num_programs(2) + tl.program_id(2)) * 2 * E + e) * 5
    bwd = fwd + E * 5
    tl.store(dwb_ptr + fwd, a0)
    tl.store(dwb_ptr + fwd + 1, a1)
    tl.store(dwb_ptr + fwd + 2, a2)
    tl.store(dwb_ptr + fwd + 3, a3)
    tl.store(dwb_ptr + fwd + 4, ab)
    tl.store(dwb_ptr + bwd, c0)
    tl.store(dwb_ptr + bwd + 1, c1)
    tl.store(dwb_ptr + bwd + 2, c2)
    tl.store(dwb_ptr + bwd + 3, c3)
    tl.store(dwb_ptr + bwd + 4, cb)


_conv_bwd = Launcher(_conv_bwd_kernel)


def _check(x, weight):
    if weight.shape[-1] != CONV_WIDTH:
        raise ValueError(f"the Triton conv has width {CONV_WIDTH}, got a weight of shape {tuple(weight.shape)}; "
                         "use ssm_backend 'cuda' or 'torch' for other widths")
    if x.stride(2) != 1:
        raise ValueError("the conv reads rows of contiguous channels: x needs stride 1 there")
    if weight.shape[0] != 2 * x.shape[2] or x.shape[2] % CONV_CHANNELS:
        raise ValueError(f"x's channels ({x.shape[2]}) must be half the weight's ({weight.shape[0]}) and a "
                         f"multiple of {CONV_CHANNELS}")


def conv_fwd(x, weight, bias):
    """x (Bt, L, E) -> u (2, Bt, L, E) contiguous in x's dtype: both directions, as in the module docstring."""
    _check(x, weight)
    bt, length, e = x.shape
    out = torch.empty(2, bt, length, e, device=x.device, dtype=x.dtype)
    _conv_fwd[(bt, 2 * e // CONV_CHANNELS, cdiv(length, CONV_TOKENS))](
        x, weight.contiguous(), bias.contiguous(), out, length, x.stride(0), x.stride(1), E=e, BD=CONV_CHANNELS,
        BL=CONV_TOKENS)
    return out


def conv_bwd(x, weight, bias, dout, dx):
    """Gradients of conv_fwd for its output gradient dout (2, Bt, L, E) contiguous: x's into dx (x's shape and
    strides); returns (dweight, dbias)."""
    _check(x, weight)
    bt, length, e = x.shape
    if dx.shape != x.shape or dx.stride() != x.stride() or dout.shape != (2, bt, length, e) or not dout.is_contiguous():
        raise ValueError("dx must have x's shape and strides, dout be (2, Bt, L, E) contiguous")
    blocks = cdiv(length, CONV_TOKENS)
    dwb = torch.empty(bt * blocks, 2 * e, CONV_WIDTH + 1, device=x.device, dtype=torch.float32)   # [weights | bias]
    _conv_bwd[(bt, e // CONV_CHANNELS, blocks)](
        x, weight.contiguous(), bias.contiguous(), dout, dx, dwb, length, x.stride(0), x.stride(1), E=e,
        BD=CONV_CHANNELS, BL=CONV_TOKENS)
    dwb = dwb.sum(0)
    return dwb[:, :CONV_WIDTH].to(weight.dtype), dwb[:, CONV_WIDTH].to(bias.dtype)


def conv_ref(x, weight, bias):
    """conv_fwd from its definition with torch's conv1d, in x's dtype: (Bt, L, E) -> (2, Bt, L, E)."""
    xs = x.transpose(1, 2)
    w = weight.unsqueeze(1).to(x.dtype)
    out = []
    for r, seq in ((0, xs), (1, xs.flip(-1))):
        e = xs.shape[1]
        y = torch.nn.functional.conv1d(seq, w[r * e:(r + 1) * e], bias[r * e:(r + 1) * e].to(x.dtype),
                                       padding=CONV_WIDTH - 1, groups=e)[..., :xs.shape[-1]]
        out.append(y if r == 0 else y.flip(-1))
    return torch.nn.functional.silu(torch.stack(out)).transpose(2, 3)
