"""Triton kernels for Vim's mixer whose cost follows the sequence length: causal depthwise conv + SiLU,
the selective scan, and the two scan directions' layout (a sequence next to its flip, and the sum back);
and the token merge of token_fusion (its linear map and that map's transpose, one pass each).

mamba-ssm's scan and causal-conv1d size their work per thread block from the sequence length in steps of
powers of two (the scan: a 197-token and a 129-token layer cost the same), so token fusion saves little
of their time until a layer drops below the next step. These kernels tile the sequence finely: a layer's
cost is proportional to its chunks of tokens.

Conv (width 4, channels first): u = SiLU(b + sum_k w_k x_{t-3+k}), zero left padding; (B, D, L) -> (B, D, L).

Scan, same contract as ``selective_scan_cuda`` with delta_softplus=True and z given (spec section 6):

    delta  = softplus(delta_raw + delta_bias)                       u, delta_raw, z: (Bt, Dc, L)
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t u_t               A: (Dc, N); B, C: (Bt, G, N, L)
    out_t  = C_t . h_t + D u_t;   out_z = out * SiLU(z)             channel d reads group d // (Dc // G)

Inside a chunk the recurrence is an associative scan over pairs (a, x) with
(a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2); the state at the end of each chunk is carried to the next, and
the state after every STATE_CHUNK tokens is kept for the backward pass (``states``: (Bt, Dc, ceil(L /
STATE_CHUNK) - 1, N), float32).

Backward, per STATE_CHUNK tokens from the last: recompute h_t from the kept state, then the state gradient
g_t = C_t dy_t + a_{t+1} g_{t+1} by a reverse scan, and with a_t h_{t-1} = h_t - x_t:
    du_t = delta_t sum_n g B + D dy        ddelta_t = sum_n g (B u + A (h - x))
    dB_t = sum_d g delta u                 dC_t = sum_d dy h            dA = sum_{b,t} g delta (h - x)
Each program writes float32 partial sums of the reductions over channels (dB, dC) or over the batch and
sequence (dA, dD, ddelta_bias, the conv's weight and bias); torch adds them up, so gradients are
deterministic.
"""
import torch
import triton
import triton.language as tl

# Tile shapes, picked by a sweep on an H200 (scripts/scan_benchmark.py --configs).
STATE_CHUNK = 16                              # tokens between kept states = the backward pass's chunk
FWD_CHUNK, FWD_CHANNELS, FWD_WARPS = 8, 8, 1  # forward: tokens per chunk (divides STATE_CHUNK), channels, warps
BWD_CHANNELS, BWD_WARPS = 4, 2                # backward: channels and warps per program


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _program_channels(A_ptr, D_ptr, bias_ptr, CH: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                      BD: tl.constexpr, T: tl.constexpr):
    """This program's batch row b, channels d (BD), state and chunk indices, B/C group g, and per-channel
    A (BD, N), D and delta bias in float32."""
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :]).to(tl.float32)
    return (tl.program_id(0).to(tl.int64), d, n, tl.arange(0, T), (tl.program_id(1) * BD) // (CH // G), A,
            tl.load(D_ptr + d).to(tl.float32), tl.load(bias_ptr + d).to(tl.float32))


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                     out_ptr, out_z_ptr, states_ptr,
                     L, n_chunks, n_states, CH: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                     BD: tl.constexpr, T: tl.constexpr, S: tl.constexpr):
    b, d, n, k, g, A, Dv, bias = _program_channels(A_ptr, D_ptr, bias_ptr, CH, G, N, BD, T)
    seq = b * CH * L + d[:, None] * L             # (BD, 1) row starts of u, delta, z, out
    bc = (b * G + g) * N * L + n[:, None] * L      # (N, 1) row starts of B, C
    st = (b * CH + d[:, None]) * n_states * N + n[None, :]
    h = tl.zeros([BD, N], dtype=tl.float32)
    for c in range(n_chunks):
        t = c * T + k
        valid = (t < L)[None, :]
        u = tl.load(u_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        delta = _softplus(tl.load(delta_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
                          + bias[:, None])
        Bt = tl.load(B_ptr + bc + t[None, :], mask=valid, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc + t[None, :], mask=valid, other=0.0).to(tl.float32)
        a = tl.where(valid[:, None, :], tl.exp(delta[:, None, :] * A[:, :, None]), 1.0)   # (BD, N, T)
        x = (delta * u)[:, None, :] * Bt[None, :, :]                                       # 0 past L
        p, hs = tl.associative_scan((a, x), 2, _affine_combine)
        hs += p * h[:, :, None]
        y = tl.sum(hs * Ct[None, :, :], 1) + Dv[:, None] * u
        z = tl.load(z_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + seq + t[None, :], y.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out_z_ptr + seq + t[None, :], (y * z * tl.sigmoid(z)).to(out_z_ptr.dtype.element_ty), mask=valid)
        h = tl.sum(tl.where(k[None, None, :] == T - 1, hs, 0.0), 2)   # a = 1, x = 0 past L keep the last state
        end = (c + 1) * T   # keep the state after every S tokens, for the backward pass's chunks
        tl.store(states_ptr + st + (end // S - 1) * N, h, mask=(end % S == 0) & (end // S <= n_states))


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_z_ptr, states_ptr, out_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dz_ptr, out_z_ptr,
                     L, n_chunks, CH: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                     BD: tl.constexpr, T: tl.constexpr):
    b, d, n, k, g, A, Dv, bias = _program_channels(A_ptr, D_ptr, bias_ptr, CH, G, N, BD, T)
    seq = b * CH * L + d[:, None] * L
    bc = (b * G + g) * N * L + n[:, None] * L
    st = (b * CH + d[:, None]) * (n_chunks - 1) * N + n[None, :]
    part = (b * (CH // BD) + tl.program_id(1)) * N * L + n[:, None] * L   # (N, 1) rows of this program's dB, dC
    g_next = tl.zeros([BD, N], dtype=tl.float32)     # state gradient at the first token of the later chunk
    dA = tl.zeros([BD, N], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * T + k
        valid = (t < L)[None, :]
        has_next = (t + 1 < L)[None, :]
        u = tl.load(u_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        delta_in = tl.load(delta_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32) + bias[:, None]
        delta = _softplus(delta_in)
        delta_next = _softplus(tl.load(delta_ptr + seq + t[None, :] + 1, mask=has_next, other=0.0).to(tl.float32)
                               + bias[:, None])
        Bt = tl.load(B_ptr + bc + t[None, :], mask=valid, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc + t[None, :], mask=valid, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        dout_z = tl.load(dout_z_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        y = tl.load(out_ptr + seq + t[None, :], mask=valid, other=0.0).to(tl.float32)
        sig_z = tl.sigmoid(z)
        dy = dout_z * z * sig_z
        dz = dout_z * y * sig_z * (1.0 + z * (1.0 - sig_z))
        tl.store(dz_ptr + seq + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)
        tl.store(out_z_ptr + seq + t[None, :], (y * z * sig_z).to(out_z_ptr.dtype.element_ty), mask=valid)

        # states of this chunk, from the state the forward pass left at the end of the previous one
        h0 = tl.load(states_ptr + st + (c - 1) * N, mask=(c > 0), other=0.0)
        a = tl.where(valid[:, None, :], tl.exp(delta[:, None, :] * A[:, :, None]), 1.0)
        du_dx = delta * u
        x = du_dx[:, None, :] * Bt[None, :, :]
        p, h = tl.associative_scan((a, x), 2, _affine_combine)
        h += p * h0[:, :, None]

        # state gradients, last token first
        a_next = tl.where(has_next[:, None, :], tl.exp(delta_next[:, None, :] * A[:, :, None]), 0.0)
        q, gs = tl.associative_scan((a_next, Ct[None, :, :] * dy[:, None, :]), 2, _affine_combine, reverse=True)
        gs += q * g_next[:, :, None]
        g_next = tl.sum(tl.where(k[None, None, :] == 0, gs, 0.0), 2)

        decayed = (h - x) * gs                     # g_t a_t h_{t-1}
        gB = tl.sum(gs * Bt[None, :, :], 1)
        tl.store(du_ptr + seq + t[None, :], (delta * gB + Dv[:, None] * dy).to(du_ptr.dtype.element_ty), mask=valid)
        ddelta = (u * gB + tl.sum(decayed * A[:, :, None], 1)) * tl.sigmoid(delta_in)
        tl.store(ddelta_ptr + seq + t[None, :], ddelta.to(ddelta_ptr.dtype.element_ty), mask=valid)
        tl.store(dB_ptr + part + t[None, :], tl.sum(gs * du_dx[:, None, :], 0), mask=valid)
        tl.store(dC_ptr + part + t[None, :], tl.sum(h * dy[:, None, :], 0), mask=valid)
        dA += tl.sum(decayed * delta[:, None, :], 2)
        dD += tl.sum(dy * u, 1)
        dbias += tl.sum(tl.where(valid, ddelta, 0.0), 1)
    tl.store(dA_ptr + (b * CH + d[:, None]) * N + n[None, :], dA)
    tl.store(dD_ptr + b * CH + d, dD)
    tl.store(dbias_ptr + b * CH + d, dbias)


def supports(channels, d_state):
    """Whether these kernels take a mixer with ``channels`` (both directions, 2E) and ``d_state``."""
    e = channels // 2
    return (channels % 2 == 0 and d_state & (d_state - 1) == 0 and e % CONV_CHANNELS == 0
            and e % FWD_CHANNELS == 0 and e % BWD_CHANNELS == 0)


def _check(u, A, B, block):
    bt, ch, _ = u.shape
    groups, n = B.shape[1], B.shape[2]
    if ch % groups or (ch // groups) % block:
        raise ValueError(f"channels ({ch}) must split into {groups} groups of a multiple of {block}")
    if n & (n - 1):
        raise ValueError(f"d_state must be a power of two for the Triton scan, got {n}")
    return bt, ch, groups, n


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk=None, channels=None, warps=None):
    """-> (out, states, out_z); shapes and math in the module docstring. chunk (tokens), channels (per
    program) and warps default to FWD_CHUNK, FWD_CHANNELS, FWD_WARPS; chunk must divide STATE_CHUNK."""
    chunk, channels, warps = chunk or FWD_CHUNK, channels or FWD_CHANNELS, warps or FWD_WARPS
    if STATE_CHUNK % chunk:
        raise ValueError(f"the forward chunk ({chunk}) must divide STATE_CHUNK ({STATE_CHUNK})")
    u, delta, B, C, z = (t.contiguous() for t in (u, delta, B, C, z))
    bt, ch, groups, n = _check(u, A, B, channels)
    length = u.shape[-1]
    n_states = triton.cdiv(length, STATE_CHUNK) - 1   # the state before each backward chunk but the first
    out, out_z = torch.empty_like(u), torch.empty_like(u)
    states = torch.empty(bt, ch, n_states, n, device=u.device, dtype=torch.float32)
    _scan_fwd_kernel[(bt, ch // channels)](
        u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), out, out_z, states,
        length, triton.cdiv(length, chunk), n_states, CH=ch, G=groups, N=n, BD=channels, T=chunk, S=STATE_CHUNK,
        num_warps=warps)
    return out, states, out_z


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout_z, states, out, channels=None, warps=None):
    """-> (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z); ddelta is the gradient of delta before
    bias and softplus, as the inputs of scan_fwd. channels and warps default to BWD_CHANNELS, BWD_WARPS."""
    channels, warps = channels or BWD_CHANNELS, warps or BWD_WARPS
    u, delta, B, C, z, dout_z, out = (t.contiguous() for t in (u, delta, B, C, z, dout_z, out))
    bt, ch, groups, n = _check(u, A, B, channels)
    length = u.shape[-1]
    n_chunks = triton.cdiv(length, STATE_CHUNK)
    if states.shape != (bt, ch, n_chunks - 1, n):
        raise ValueError(f"states of shape {tuple(states.shape)} do not match the inputs "
                         f"(expected {(bt, ch, n_chunks - 1, n)} from scan_fwd)")
    du, ddelta, dz, out_z = (torch.empty_like(u) for _ in range(4))
    f32 = dict(device=u.device, dtype=torch.float32)
    dA, dD, dbias = torch.empty(bt, ch, n, **f32), torch.empty(bt, ch, **f32), torch.empty(bt, ch, **f32)
    dB, dC = (torch.empty(bt, ch // channels, n, length, **f32) for _ in range(2))
    _scan_bwd_kernel[(bt, ch // channels)](
        u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), dout_z, states, out,
        du, ddelta, dA, dB, dC, dD, dbias, dz, out_z,
        length, n_chunks, CH=ch, G=groups, N=n, BD=channels, T=STATE_CHUNK, num_warps=warps)
    per_group = (bt, groups, ch // channels // groups, n, length)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.view(per_group).sum(2).to(B.dtype),
            dC.view(per_group).sum(2).to(C.dtype), dD.sum(0).to(D.dtype), dbias.sum(0).to(delta_bias.dtype), dz, out_z)


# ----------------------------------------------------------------------------- causal conv1d + SiLU

CONV_WIDTH = 4
CONV_CHANNELS, CONV_TOKENS = 16, 64


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, CH: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.program_id(2) * BL + tl.arange(0, BL)
    row = tl.program_id(0).to(tl.int64) * CH * L + d[:, None] * L
    acc = tl.zeros([BD, BL], dtype=tl.float32) + tl.load(b_ptr + d).to(tl.float32)[:, None]
    for k in tl.static_range(4):
        pos = t - 3 + k
        xk = tl.load(x_ptr + row + pos[None, :], mask=((pos >= 0) & (pos < L))[None, :], other=0.0)
        acc += tl.load(w_ptr + d * 4 + k).to(tl.float32)[:, None] * xk.to(tl.float32)
    tl.store(out_ptr + row + t[None, :], (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty),
             mask=(t < L)[None, :])


@triton.jit
def _dpre(acc, dout_ptr, row, pos, L):
    """Gradient before SiLU at positions pos, from the pre-activation acc; 0 past the sequence."""
    dout = tl.load(dout_ptr + row + pos[None, :], mask=(pos < L)[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(acc)
    return dout * sig * (1.0 + acc * (1.0 - sig))


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, L,
                     CH: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.program_id(2) * BL + tl.arange(0, BL)
    row = tl.program_id(0).to(tl.int64) * CH * L + d[:, None] * L
    # x at offsets -3..3 from t; pre-activations at t, t+1, t+2, t+3 (each output t reads x_{t-3..t})
    xm3 = tl.load(x_ptr + row + (t - 3)[None, :], mask=((t >= 3) & (t - 3 < L))[None, :], other=0.0).to(tl.float32)
    xm2 = tl.load(x_ptr + row + (t - 2)[None, :], mask=((t >= 2) & (t - 2 < L))[None, :], other=0.0).to(tl.float32)
    xm1 = tl.load(x_ptr + row + (t - 1)[None, :], mask=((t >= 1) & (t - 1 < L))[None, :], other=0.0).to(tl.float32)
    x0 = tl.load(x_ptr + row + t[None, :], mask=(t < L)[None, :], other=0.0).to(tl.float32)
    xp1 = tl.load(x_ptr + row + (t + 1)[None, :], mask=(t + 1 < L)[None, :], other=0.0).to(tl.float32)
    xp2 = tl.load(x_ptr + row + (t + 2)[None, :], mask=(t + 2 < L)[None, :], other=0.0).to(tl.float32)
    xp3 = tl.load(x_ptr + row + (t + 3)[None, :], mask=(t + 3 < L)[None, :], other=0.0).to(tl.float32)
    w0 = tl.load(w_ptr + d * 4).to(tl.float32)[:, None]
    w1 = tl.load(w_ptr + d * 4 + 1).to(tl.float32)[:, None]
    w2 = tl.load(w_ptr + d * 4 + 2).to(tl.float32)[:, None]
    w3 = tl.load(w_ptr + d * 4 + 3).to(tl.float32)[:, None]
    bias = tl.load(b_ptr + d).to(tl.float32)[:, None]
    g0 = _dpre(bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, dout_ptr, row, t, L)
    g1 = _dpre(bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1, dout_ptr, row, t + 1, L)
    g2 = _dpre(bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2, dout_ptr, row, t + 2, L)
    g3 = _dpre(bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3, dout_ptr, row, t + 3, L)
    tl.store(dx_ptr + row + t[None, :], (w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3).to(dx_ptr.dtype.element_ty),
             mask=(t < L)[None, :])
    # partial weight and bias gradients of this program: its batch row and its tokens
    part = (tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * CH + d
    tl.store(dw_ptr + part * 4, tl.sum(g0 * xm3, 1))
    tl.store(dw_ptr + part * 4 + 1, tl.sum(g0 * xm2, 1))
    tl.store(dw_ptr + part * 4 + 2, tl.sum(g0 * xm1, 1))
    tl.store(dw_ptr + part * 4 + 3, tl.sum(g0 * x0, 1))
    tl.store(db_ptr + part, tl.sum(g0, 1))


def _conv_check(x, weight):
    if weight.shape[-1] != CONV_WIDTH:
        raise ValueError(f"the Triton causal conv has width {CONV_WIDTH}, got a weight of shape "
                         f"{tuple(weight.shape)}; use ssm_backend 'cuda' or 'torch' for other widths")
    if x.shape[1] % CONV_CHANNELS:
        raise ValueError(f"channels ({x.shape[1]}) must be a multiple of {CONV_CHANNELS} for the Triton conv")


def conv_fwd(x, weight, bias):
    """SiLU(causal depthwise conv). x: (B, D, L); weight: (D, 4); bias: (D,) -> (B, D, L) in x's dtype."""
    _conv_check(x, weight)
    x = x.contiguous()
    bt, ch, length = x.shape
    out = torch.empty_like(x)
    _conv_fwd_kernel[(bt, ch // CONV_CHANNELS, triton.cdiv(length, CONV_TOKENS))](
        x, weight.contiguous(), bias.contiguous(), out, length, CH=ch, BD=CONV_CHANNELS, BL=CONV_TOKENS)
    return out


def conv_bwd(x, weight, bias, dout):
    """-> (dx, dweight, dbias) for conv_fwd's output gradient dout."""
    _conv_check(x, weight)
    x, dout = x.contiguous(), dout.contiguous()
    bt, ch, length = x.shape
    blocks = triton.cdiv(length, CONV_TOKENS)
    dx = torch.empty_like(x)
    dw = torch.empty(bt * blocks, ch, CONV_WIDTH, device=x.device, dtype=torch.float32)
    db = torch.empty(bt * blocks, ch, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[(bt, ch // CONV_CHANNELS, blocks)](
        x, weight.contiguous(), bias.contiguous(), dout, dx, dw, db, length, CH=ch, BD=CONV_CHANNELS, BL=CONV_TOKENS)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------- the two scan directions' layout
# The mixer scans each sequence forwards and flipped. Built from torch ops, [x ; flip(x)] costs a flip and a cat
# (two round trips through memory) and y_fwd + flip(y_bwd) a flip and an add; these kernels do each in one pass.

LAYOUT_BLOCK = 1024  # elements per program


@triton.jit
def _mirror_kernel(src_ptr, dst_ptr, L, EL, BATCH, stride_b, stride_c,
                   E: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0) // PARTS
    p = tl.program_id(0) % PARTS
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)   # flat (channel, token) index in one part
    valid = i < EL
    e = i // L
    t = i - e * L
    x = tl.load(src_ptr + b.to(tl.int64) * stride_b + (p * E + e).to(tl.int64) * stride_c + t, mask=valid)
    row = (p * BATCH + b).to(tl.int64) * 2 * EL
    tl.store(dst_ptr + row + i, x, mask=valid)
    tl.store(dst_ptr + row + EL + e * L + (L - 1 - t), x, mask=valid)


@triton.jit
def _fold_kernel(src_ptr, dst_ptr, L, EL, stride_b, stride_c, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = i < EL
    e = i // L
    t = i - e * L
    fwd = tl.load(src_ptr + b * 2 * EL + i, mask=valid).to(tl.float32)
    bwd = tl.load(src_ptr + b * 2 * EL + EL + e * L + (L - 1 - t), mask=valid).to(tl.float32)
    tl.store(dst_ptr + b * stride_b + e.to(tl.int64) * stride_c + t, (fwd + bwd).to(dst_ptr.dtype.element_ty),
             mask=valid)


def mirror(src, parts):
    """src (B, P*E, L), tokens contiguous -> P contiguous tensors (B, 2E, L): [part ; part flipped along L]."""
    if src.stride(2) != 1:
        src = src.contiguous()
    bt, ch, length = src.shape
    if ch % parts:
        raise ValueError(f"{ch} channels do not split into {parts} parts")
    e = ch // parts
    dst = torch.empty(parts, bt, 2 * e, length, device=src.device, dtype=src.dtype)
    _mirror_kernel[(bt * parts, triton.cdiv(e * length, LAYOUT_BLOCK))](
        src, dst, length, e * length, bt, src.stride(0), src.stride(1), E=e, PARTS=parts, BLOCK=LAYOUT_BLOCK)
    return dst.unbind(0)


def fold(src, out=None):
    """src (B, 2E, L) [forward ; backward direction in flipped order] -> out (B, E, L) = forward + flip(backward),
    added in float32. out may be a strided view with contiguous tokens (a slice of a larger tensor)."""
    src = src.contiguous()
    bt, ch, length = src.shape
    if out is None:
        out = torch.empty(bt, ch // 2, length, device=src.device, dtype=src.dtype)
    if out.shape != (bt, ch // 2, length) or out.stride(2) != 1:
        raise ValueError(f"out must be ({bt}, {ch // 2}, {length}) with contiguous tokens, got {tuple(out.shape)} "
                         f"with strides {out.stride()}")
    _fold_kernel[(bt, triton.cdiv(ch // 2 * length, LAYOUT_BLOCK))](
        src, out, length, ch // 2 * length, out.stride(0), out.stride(1), BLOCK=LAYOUT_BLOCK)
    return out


# ----------------------------------------------------------------------------- token matching (token_fusion.fuse)
# In torch, bipartite matching and the fusion map it implies take about 30 small kernels per fused layer (normalise,
# score, mask the class token, max, two sorts, gathers, scatters, the group sizes). Here one program per sample
# does all of it for the paper's setting (output order "released", plain mean).

@triton.jit
def _fusion_map_kernel(x_ptr, cls_ptr, src_ptr, dst_ptr, keep_ptr, dest_ptr, weight_ptr, cls_out_ptr,
                       T, C, NA, NB, R, CLS, CLS_MODE: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                       BC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = x_ptr + b * T * C
    i = tl.arange(0, BA)   # A token i sits at position 2i
    j = tl.arange(0, BB)   # B token j at 2j + 1
    dots = tl.zeros([BA, BB], dtype=tl.float32)
    sq_a = tl.zeros([BA], dtype=tl.float32)
    sq_b = tl.zeros([BB], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        a = tl.load(rows + (2 * i)[:, None] * C + c[None, :], mask=(i < NA)[:, None] & (c < C)[None, :],
                    other=0.0).to(tl.float32)
        bt = tl.load(rows + (2 * j + 1)[:, None] * C + c[None, :], mask=(j < NB)[:, None] & (c < C)[None, :],
                     other=0.0).to(tl.float32)
        dots += tl.dot(a, tl.trans(bt), input_precision="ieee")
        sq_a += tl.sum(a * a, 1)
        sq_b += tl.sum(bt * bt, 1)
    # cosine similarity, each norm clamped as F.normalize does
    scores = dots / tl.maximum(tl.sqrt(sq_a), 1e-12)[:, None] / tl.maximum(tl.sqrt(sq_b), 1e-12)[None, :]
    if CLS_MODE == 0:
        cls = -1
    elif CLS_MODE == 1:
        cls = CLS
    else:
        cls = tl.load(cls_ptr + b)
    masked = ((j >= NB) | (2 * j + 1 == cls))[None, :] | (2 * i == cls)[:, None]
    scores = tl.where(masked, float("-inf"), scores)
    best = tl.where(i < NA, tl.max(scores, 1), float("-inf"))
    partner = tl.argmax(scores, 1)
    # rank by best score, descending; ties go to the earlier token (a stable sort)
    ahead = (best[None, :] > best[:, None]) | ((best[None, :] == best[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum(ahead.to(tl.int32), 1)
    fused = rank < R
    kept = (i < NA) & (rank >= R)
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1          # output row of a kept A token
    first_b = NA - R                                    # B tokens follow the kept A tokens
    into = first_b + partner                            # output row a fused A token lands in
    out = b * (T - R)
    tl.store(src_ptr + b * R + rank, (2 * i).to(tl.int64), mask=fused)
    tl.store(dst_ptr + b * R + rank, into.to(tl.int64), mask=fused)
    tl.store(keep_ptr + out + pos, (2 * i).to(tl.int64), mask=kept)
    tl.store(keep_ptr + out + first_b + j, (2 * j + 1).to(tl.int64), mask=j < NB)
    tl.store(dest_ptr + b * T + 2 * i, tl.where(fused, into, pos).to(tl.int64), mask=i < NA)
    tl.store(dest_ptr + b * T + 2 * j + 1, (first_b + j).to(tl.int64), mask=j < NB)
    landed = tl.sum(((partner[:, None] == j[None, :]) & fused[:, None]).to(tl.float32), 0)
    tl.store(weight_ptr + out + pos, tl.full([BA], 1.0, tl.float32), mask=kept)
    tl.store(weight_ptr + out + first_b + j, 1.0 + landed, mask=j < NB)
    if CLS_MODE != 0:   # the class token is never fused: a kept A token or a B token
        cls_pos = tl.sum(tl.where(2 * i == cls, pos, 0), 0)
        tl.store(cls_out_ptr + b, tl.where(cls % 2 == 0, cls_pos, first_b + cls // 2).to(tl.int64))


FUSION_MAP_MAX_TOKENS = 256  # a program holds the (T/2)^2 scores in registers: 128 x 128 at most


def fusion_map(x, r, cls_index=None):
    """token_fusion's matching and fusion map for output order "released" and the plain mean, one program per
    sample. x (B, T, C) is the similarity metric; r tokens are fused; cls_index (int, (B,) long tensor or None)
    is never fused. Returns (src, keep, dst_out, dest, weight, cls_out) as token_fusion's torch path builds them:
    src (B, r) fused A positions ordered by their score, keep (B, T - r) source position of every output row,
    dst_out (B, r) output row each src token lands in, dest (B, T) output row of every input token, weight
    (B, T - r, 1) float32 group sizes, cls_out the class token's output row ((B,) long; None or 0 as given)."""
    x = x.contiguous()
    bt, t, c = x.shape
    na, nb = (t + 1) // 2, t // 2
    if not 0 < r <= nb:
        raise ValueError(f"can fuse 1..{nb} of {t} tokens, got r={r}")
    if t > FUSION_MAP_MAX_TOKENS:
        raise ValueError(f"fusion_map takes at most {FUSION_MAP_MAX_TOKENS} tokens, got {t}")
    long = dict(device=x.device, dtype=torch.long)
    src, dst_out, keep, dest = (torch.empty(bt, n, **long) for n in (r, r, t - r, t))
    weight = torch.empty(bt, t - r, 1, device=x.device, dtype=torch.float32)
    cls_out = torch.empty(bt, **long)
    mode = 0 if cls_index is None else 1 if isinstance(cls_index, int) else 2
    _fusion_map_kernel[(bt,)](
        x, cls_index.contiguous() if mode == 2 else cls_out, src, dst_out, keep, dest, weight, cls_out,
        t, c, na, nb, r, cls_index if mode == 1 else 0, CLS_MODE=mode,
        BA=max(16, triton.next_power_of_2(na)), BB=max(16, triton.next_power_of_2(nb)), BC=32, num_warps=8)
    static = cls_index is None or (mode == 1 and cls_index == 0)
    return src, keep, dst_out, dest, weight, cls_index if static else cls_out


# ----------------------------------------------------------------------------- token merge (token_fusion.merge)
# In torch the merge of one stream is a gather of the kept rows, a gather and an index_add of the fused rows and
# a broadcast division; its backward a division and a gather. Each is one pass here, and the division happens in
# float32 before the single rounding to the stream's dtype.

@triton.jit
def _merge_rows_kernel(x_ptr, out_ptr, keep_ptr, src_ptr, dst_ptr, weight_ptr, T, T_OUT, R, C,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0)   # b * T_OUT + j
    b = row // T_OUT
    c = tl.arange(0, BLOCK)
    cm = c < C
    base = b.to(tl.int64) * T
    acc = tl.load(x_ptr + (base + tl.load(keep_ptr + row)) * C + c, mask=cm).to(tl.float32)
    for k in range(R):   # the r fused rows of this sample that land on output row j
        hit = tl.load(dst_ptr + b * R + k) == row - b * T_OUT
        src = tl.load(src_ptr + b * R + k)
        acc += tl.load(x_ptr + (base + src) * C + c, mask=cm & hit, other=0.0).to(tl.float32)
    out = acc / tl.load(weight_ptr + row)
    tl.store(out_ptr + row.to(tl.int64) * C + c, out.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _gather_rows_kernel(g_ptr, out_ptr, dest_ptr, weight_ptr, T, T_OUT, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)   # b * T + i
    c = tl.arange(0, BLOCK)
    cm = c < C
    j = (row // T).to(tl.int64) * T_OUT + tl.load(dest_ptr + row)
    g = tl.load(g_ptr + j * C + c, mask=cm).to(tl.float32) / tl.load(weight_ptr + j)
    tl.store(out_ptr + row.to(tl.int64) * C + c, g.to(out_ptr.dtype.element_ty), mask=cm)


def _row_block(c):
    block = triton.next_power_of_2(c)
    return dict(BLOCK=block, num_warps=max(1, min(block // 256, 8)))


def merge_rows(x, keep, src, dst, weight):
    """x (B, T, C) -> (B, T', C): out[b, j] = (x[b, keep[b, j]] + sum over k with dst[b, k] = j of x[b, src[b, k]])
    / weight[b, j]; keep (B, T'), src and dst (B, r) long, weight (B, T') or (B, T', 1) float32."""
    x = x.contiguous()
    bt, t, c = x.shape
    t_out, r = keep.shape[1], src.shape[1]
    out = torch.empty(bt, t_out, c, device=x.device, dtype=x.dtype)
    _merge_rows_kernel[(bt * t_out,)](x, out, keep.contiguous(), src.contiguous(), dst.contiguous(),
                                      weight.contiguous(), t, t_out, r, c, **_row_block(c))
    return out


def gather_rows(g, dest, weight):
    """The merge's transpose: g (B, T', C) -> (B, T, C), out[b, i] = g[b, dest[b, i]] / weight[b, dest[b, i]];
    dest (B, T) long (the output row of each input row), weight (B, T') or (B, T', 1) float32."""
    g = g.contiguous()
    bt, t_out, c = g.shape
    t = dest.shape[1]
    out = torch.empty(bt, t, c, device=g.device, dtype=g.dtype)
    _gather_rows_kernel[(bt * t,)](g, out, dest.contiguous(), weight.contiguous(), t, t_out, c, **_row_block(c))
    return out
