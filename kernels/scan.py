"""Vim's bidirectional selective scan, token-major, both directions in one kernel (spec section 6).

Layout: tokens are rows, channels contiguous, as the GEMMs around the scan produce and consume them.
Direction 0 scans tokens 0..L-1, direction 1 scans L-1..0 (the flipped sequence, read in place):

    delta  = softplus(delta_raw + delta_bias)        u, delta_raw (2, Bt, L, E): [direction 0, direction 1]
    h_t    = exp(delta_t A) h_prev + delta_t B_t u_t  BC (2, Bt, L, 2N): [B_t | C_t]; A (2E, N), D, delta_bias (2E)
    y_t    = C_t . h_t + D u_t                       per direction; h_prev the state of the token scanned before
    y      = y_dir0 + y_dir1;   out_z = y * SiLU(z)  z, y, out_z (Bt, L, E)

A program is one warp; it holds the state (N, 32 channels) in registers, one channel per lane with all N states
(the sum over N stays in the thread), and steps through the tokens one at a time, each step's loads issued one
step ahead so that their latency hides behind the previous step's arithmetic. B and C are read as float32 rows,
four values per 128-bit load (``bc_rows``); exp(delta A) is exp2(delta A log2 e) with A scaled once. The forward
program runs both directions in the same loop (token s of one and L-1-s of the other), so the sum over
directions happens in the kernel: a direction that reaches a token first leaves its part in ``y``, the other
adds it. The state after every STATE_CHUNK steps of each direction is kept for the backward pass (``states``:
(Bt, 2, ceil(L / STATE_CHUNK) - 1, N, E) float32).

Backward, per direction and per STATE_CHUNK steps from the last (a partial last chunk runs only its tokens),
in pieces of T steps (PIECE), the last first: the piece's states are recomputed from the chunk's kept one
(advanced over the chunk's earlier steps) into a per-program scratch buffer, then the state gradient g_t = C_t dy_t +
a_next g_next runs backwards (dy = dout_z SiLU(z), the same for both directions), and with a_t h_prev = h_t - x_t:
    du_t = delta_t sum_n g B + D dy        ddelta_t = sum_n g (B u + A (h - x))
    dB_t = sum_d g delta u                 dC_t = sum_d dy h            dA = sum_{b,t} g delta (h - x)
dB and dC are sums over the warp's channels (``_channel_sums``: a butterfly that hands each lane one state's
sum) written as float32 partial sums per channel block, dA, dD and the delta bias's gradient per batch row; the
caller adds them up, so the gradients are deterministic. The scratch of the ~1600 programs resident on an H200 is
about the size of its L2 cache with whole chunks (32 KB each): halving it with pieces of 8 steps paid for the 8
steps more per chunk with bfloat16 sequences but not with float32 ones (results/scan_pieces_h200.json), so 16-bit
sequences (float16's too, not timed) take pieces of 8 and float32 ones whole chunks.

How the code keeps the compiler to this layout (checked in the compiled loops of Triton 3.6 and 3.8: no shared
memory, no shuffles but the channel sums; scripts/inspect_kernels.py, tests/test_kernels_compiled.py): every (N,
channels) tile in memory has consecutive channels consecutive (A is read stored (N, 2E)), no argument is
specialised (so no alignment is known that would invite wide accesses along the channels, splitting a channel's
states over threads), and the small B/C rows come in through inline PTX, which Triton's interpreter replaces by
plain loads.
"""
import inspect

import torch
import triton
import triton.language as tl

from kernels.launch import INTERPRETED, Launcher, cdiv

STATE_CHUNK = 16   # steps between kept states = the backward pass's chunk
# Steps of a chunk whose states the backward holds in its scratch at a time, by the sequences' element size (module
# docstring: why)
PIECE = {2: 8, 4: STATE_CHUNK}
# A program is one warp with one channel per lane (the backward's channel sums shuffle across the lanes).
CHANNELS = 32
# Triton's interpreter (the CPU tests) runs no PTX: it takes the tl.gather / tl.load forms of the PTX helpers
PTX = not INTERPRETED
LOG2E, LN2 = tl.constexpr(1.4426950408889634), tl.constexpr(0.6931471805599453)


def _unspecialised(fn):
    """triton.jit with no argument specialised on its value or alignment (see the module docstring)."""
    names = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[n for n, p in names.items() if p.annotation is inspect.Parameter.empty
                                             and not n.endswith("_ptr")],
                      do_not_specialize_on_alignment=[n for n in names if n.endswith("_ptr")])


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _step(h, u, delta_raw, bias, A2, Bt, Ct, Dv):
    """One token of one direction: -> (state after it, y before the gate). h, A2 = A log2(e): (N, channels)."""
    delta = _softplus(delta_raw + bias)
    h = tl.exp2(delta[None, :] * A2) * h + Bt[:, None] * (delta * u)[None, :]
    return h, tl.sum(h * Ct[:, None], 0) + Dv * u


@triton.jit
def _row(ptrs, PTX: tl.constexpr):
    """N contiguous float32 at ptrs (N,), 16-byte aligned, all in every thread: four per 128-bit load. (Triton
    would spread such a small vector over the threads, one value each, and hand it round through shared
    memory.)"""
    if PTX:
        return tl.inline_asm_elementwise("ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l,l,l,l",
                                         [ptrs], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return tl.load(ptrs)


@triton.jit
def _drive(u_row, dl_row, bc_row, t, s_dt, s_bt, N: tl.constexpr, PTX: tl.constexpr):
    """The part of _token that advances a state: u, delta before softplus, B."""
    return tl.load(u_row + t * s_dt), tl.load(dl_row + t * s_dt), _row(bc_row + t * s_bt + tl.arange(0, N), PTX)


@triton.jit
def _token(u_row, dl_row, bc_row, z_row, t, s_dt, s_bt, s_zt, N: tl.constexpr, PTX: tl.constexpr):
    """One token's inputs of one direction: u, delta before softplus, B, C (N,) float32, z. Callers clamp t
    into the sequence rather than mask the loads (a masked load costs a second instruction per value), and
    convert u, delta and z to float32 only in the step that uses them: a conversion right after the load would
    wait for it, where the step ahead is what hides its latency."""
    bc = bc_row + t * s_bt + tl.arange(0, N)
    return (tl.load(u_row + t * s_dt), tl.load(dl_row + t * s_dt), _row(bc, PTX), _row(bc + N, PTX),
            tl.load(z_row + t * s_zt))


@triton.jit
def _lane_xor(x, lane, O: tl.constexpr, PTX: tl.constexpr):
    """x (M, BD) as held by lane ^ O: one channel per lane, so the lanes are the channel axis."""
    if PTX:
        return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=f,f,r",
                                         [x, tl.full(x.shape, O, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.gather(x, tl.broadcast_to(lane ^ O, x.shape), 1)


@triton.jit
def _halve(x, lane, O: tl.constexpr, M: tl.constexpr, BD: tl.constexpr, PTX: tl.constexpr):
    """(2M, BD) -> (M, BD): lanes with bit O keep rows M.., the others rows ..M, each adding its partner's."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, (2, M, BD)), (1, 2, 0)))
    upper = (lane & O) != 0
    return tl.where(upper, hi, lo) + _lane_xor(tl.where(upper, lo, hi), lane, O, PTX)


@triton.jit
def _channel_sums(x, N: tl.constexpr, LOG_N: tl.constexpr, BD: tl.constexpr, PTX: tl.constexpr):
    """x (N, BD) -> (BD,): lane l holds sum_d x[l // (BD // N), d]; BD = 32, one warp, N <= 32. Each butterfly
    step exchanges half of the rows a lane still holds, so the N sums take N - 1 + log2(BD / N) shuffles instead
    of N log2(BD)."""
    lane = tl.arange(0, BD)[None, :]
    for i in tl.static_range(LOG_N):
        x = _halve(x, lane, BD >> (i + 1), N >> (i + 1), BD, PTX)
    for i in tl.static_range(LOG_N, 5):   # the rest of the 5 = log2(32) lane bits
        x = x + _lane_xor(x, lane, BD >> (i + 1), PTX)
    return tl.reshape(x, (BD,))


@_unspecialised
def _scan_fwd_kernel(u_ptr, delta_ptr, bc_ptr, z_ptr, A_ptr, D_ptr, bias_ptr, y_ptr, out_z_ptr, states_ptr,
                     L, n_states, s_dd, s_db, s_dt, s_bd, s_bb, s_bt, s_zb, s_zt,
                     E: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, S: tl.constexpr, PTX: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    # (N, channels) tiles, a thread holding all N states of its channel (module docstring: how)
    tile = n[:, None] * 2 * E + d[None, :]   # A stored (N, 2E)
    A0 = tl.load(A_ptr + tile) * LOG2E
    A1 = tl.load(A_ptr + E + tile) * LOG2E
    D0, D1 = tl.load(D_ptr + d), tl.load(D_ptr + E + d)
    bias0, bias1 = tl.load(bias_ptr + d), tl.load(bias_ptr + E + d)
    u_row = u_ptr + b * s_db + d   # u has delta's layout
    dl_row = delta_ptr + b * s_db + d
    bc0 = bc_ptr + b * s_bb
    bc1 = bc0 + s_bd
    z_row = z_ptr + b * s_zb + d
    y_row = y_ptr + b * L * E + d
    oz_row = out_z_ptr + b * L * E + d
    st = states_ptr + b * 2 * n_states * N * E + n[:, None] * E + d[None, :]
    h0 = tl.zeros([N, BD], dtype=tl.float32)
    h1 = tl.zeros([N, BD], dtype=tl.float32)
    # each step's loads are issued one step ahead, so that their latency hides behind a step of arithmetic
    nu0, ndl0, nB0, nC0, nz0 = _token(u_row, dl_row, bc0, z_row, 0, s_dt, s_bt, s_zt, N, PTX)
    nu1, ndl1, nB1, nC1, nz1 = _token(u_row + s_dd, dl_row + s_dd, bc1, z_row, L - 1, s_dt, s_bt, s_zt, N, PTX)
    for s in range(L):
        t0, t1 = s, L - 1 - s
        u0, dl0, B0, C0, z0 = nu0.to(tl.float32), ndl0.to(tl.float32), nB0, nC0, nz0.to(tl.float32)
        u1, dl1, B1, C1, z1 = nu1.to(tl.float32), ndl1.to(tl.float32), nB1, nC1, nz1.to(tl.float32)
        nu0, ndl0, nB0, nC0, nz0 = _token(u_row, dl_row, bc0, z_row, tl.minimum(t0 + 1, L - 1), s_dt, s_bt,
                                          s_zt, N, PTX)
        nu1, ndl1, nB1, nC1, nz1 = _token(u_row + s_dd, dl_row + s_dd, bc1, z_row, tl.maximum(t1 - 1, 0), s_dt,
                                          s_bt, s_zt, N, PTX)
        # the first half of the steps meets tokens the other direction has not reached: keep the part; the
        # middle token (odd L) gets both parts in this step; the second half adds the kept parts
        late = 2 * s > L - 1
        kept0 = tl.load(y_row + t0 * E, mask=late, other=0.0)
        kept1 = tl.load(y_row + t1 * E, mask=late, other=0.0)
        h0, y0 = _step(h0, u0, dl0, bias0, A0, B0, C0, D0)
        h1, y1 = _step(h1, u1, dl1, bias1, A1, B1, C1, D1)
        mid = 2 * s == L - 1
        y0_sum = y0 + kept0 + tl.where(mid, y1, 0.0)
        y1_sum = y1 + kept1 + tl.where(mid, y0, 0.0)
        tl.store(y_row + t0 * E, y0_sum)
        tl.store(y_row + t1 * E, y1_sum)
        done = 2 * s >= L - 1
        tl.store(oz_row + t0 * E, (y0_sum * z0 * tl.sigmoid(z0)).to(out_z_ptr.dtype.element_ty), mask=done)
        tl.store(oz_row + t1 * E, (y1_sum * z1 * tl.sigmoid(z1)).to(out_z_ptr.dtype.element_ty), mask=done)
        if ((s + 1) % S == 0) & ((s + 1) // S <= n_states):
            at = ((s + 1) // S - 1) * N * E
            tl.store(st + at, h0)
            tl.store(st + n_states * N * E + at, h1)


@_unspecialised
def _scan_bwd_kernel(u_ptr, delta_ptr, bc_ptr, z_ptr, A_ptr, D_ptr, bias_ptr, dout_z_ptr, y_ptr,
                     states_ptr, scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, out_z_ptr, dparams_ptr,
                     dbc_ptr, L, n_chunks, s_dd, s_db, s_dt, s_bd, s_bb, s_bt, s_zb, s_zt, s_gb, s_gt, s_xb, s_xt,
                     E: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, BD: tl.constexpr, S: tl.constexpr,
                     T: tl.constexpr, PTX: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)                      # direction
    blk = tl.program_id(2)
    lane = tl.arange(0, BD)
    d = blk * BD + lane                       # channel within the direction
    n = tl.arange(0, N)
    ch = r * E + d
    tile = n[:, None] * 2 * E + ch[None, :]   # as in the forward kernel: one channel per thread
    A2 = tl.load(A_ptr + tile) * LOG2E   # (N, channels)
    Dv, bias = tl.load(D_ptr + ch), tl.load(bias_ptr + ch)
    u_row = u_ptr + r * s_dd + b * s_db + d
    dl_row = delta_ptr + r * s_dd + b * s_db + d
    bc_row = bc_ptr + r * s_bd + b * s_bb
    z_row = z_ptr + b * s_zb + d
    g_row = dout_z_ptr + b * s_gb + d
    y_row = y_ptr + b * L * E + d
    first = r == 0                            # direction 0 also writes dz and out_z, once per token
    n_blocks = tl.num_programs(2)
    # a channel sum lands in lane l for state l // (BD // N); one lane of each group writes it
    dbc_row = dbc_ptr + ((r * n_blocks + blk) * tl.num_programs(0) + b) * L * 2 * N + lane // (BD // N)
    sums_out = lane % (BD // N) == 0
    scratch = scratch_ptr + ((b * 2 + r) * n_blocks + blk) * T * N * BD + n[:, None] * BD + lane[None, :]
    st = states_ptr + (b * 2 + r) * (n_chunks - 1) * N * E + n[:, None] * E + d[None, :]
    g_carry = tl.zeros([N, BD], dtype=tl.float32)   # a_next g_next
    dA = tl.zeros([N, BD], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        steps = tl.minimum(L - c * S, S)      # the last chunk may be partial: it runs only its tokens
        n_pieces = tl.cdiv(steps, T) if T < S else 1
        for k in range(n_pieces):   # the chunk in pieces of T steps, the last first (module docstring: why)
            j0 = (n_pieces - 1 - k) * T if T < S else 0
            piece = tl.minimum(steps - j0, T) if T < S else steps
            h = tl.load(st + (c - 1) * N * E, mask=c > 0, other=0.0)
            t = tl.where(r == 0, c * S, L - 1 - c * S)
            nu, ndl, nB = _drive(u_row, dl_row, bc_row, t, s_dt, s_bt, N, PTX)
            for j in range(j0):   # the kept state advanced to the piece's first step
                s = c * S + j
                u, dl, Bt = nu.to(tl.float32), ndl.to(tl.float32), nB
                t_next = tl.minimum(tl.maximum(tl.where(r == 0, s + 1, L - 2 - s), 0), L - 1)
                nu, ndl, nB = _drive(u_row, dl_row, bc_row, t_next, s_dt, s_bt, N, PTX)
                delta = _softplus(dl + bias)
                h = tl.exp2(delta[None, :] * A2) * h + Bt[:, None] * (delta * u)[None, :]
            s = c * S + j0
            t = tl.where(r == 0, s, L - 1 - s)
            nu, ndl, nB, nC, nz = _token(u_row, dl_row, bc_row, z_row, t, s_dt, s_bt, s_zt, N, PTX)
            ng = tl.load(g_row + t * s_gt)
            for j in range(piece):   # the piece's states, and dC, which needs only them
                s = c * S + j0 + j
                t = tl.where(r == 0, s, L - 1 - s)
                u, dl, Bt, z, dout_z = nu.to(tl.float32), ndl.to(tl.float32), nB, nz.to(tl.float32), ng.to(tl.float32)
                t_next = tl.where(r == 0, s + 1, L - 2 - s)
                t_next = tl.minimum(tl.maximum(t_next, 0), L - 1)
                nu, ndl, nB, nC, nz = _token(u_row, dl_row, bc_row, z_row, t_next, s_dt, s_bt, s_zt, N, PTX)
                ng = tl.load(g_row + t_next * s_gt)
                delta = _softplus(dl + bias)
                h = tl.exp2(delta[None, :] * A2) * h + Bt[:, None] * (delta * u)[None, :]
                tl.store(scratch + j * N * BD, h)
                dy = dout_z * z * tl.sigmoid(z)
                tl.store(dbc_row + t * 2 * N + N, _channel_sums(h * dy[None, :], N, LOG_N, BD, PTX), mask=sums_out)
            tl.debug_barrier()
            s = c * S + j0 + piece - 1
            t = tl.where(r == 0, s, L - 1 - s)
            nu, ndl, nB, nC, nz = _token(u_row, dl_row, bc_row, z_row, t, s_dt, s_bt, s_zt, N, PTX)
            ng = tl.load(g_row + t * s_gt)
            ny = tl.load(y_row + t * E)
            nh = tl.load(scratch + (piece - 1) * N * BD)
            for jj in range(piece):   # last token first
                j = piece - 1 - jj
                s = c * S + j0 + j
                t = tl.where(r == 0, s, L - 1 - s)
                u, dl, Bt, Ct, z, dout_z, y, h = (nu.to(tl.float32), ndl.to(tl.float32), nB, nC, nz.to(tl.float32),
                                                  ng.to(tl.float32), ny, nh)
                t_next = tl.where(r == 0, s - 1, L - s)
                t_next = tl.minimum(tl.maximum(t_next, 0), L - 1)
                nu, ndl, nB, nC, nz = _token(u_row, dl_row, bc_row, z_row, t_next, s_dt, s_bt, s_zt, N, PTX)
                ng = tl.load(g_row + t_next * s_gt)
                ny = tl.load(y_row + t_next * E)
                nh = tl.load(scratch + tl.maximum(j - 1, 0) * N * BD)
                delta_in = dl + bias
                delta = _softplus(delta_in)
                sig_z = tl.sigmoid(z)
                dy = dout_z * z * sig_z
                g = Ct[:, None] * dy[None, :] + g_carry
                g_carry = tl.exp2(delta[None, :] * A2) * g
                du_dx = delta * u
                decayed = (h - Bt[:, None] * du_dx[None, :]) * g   # g_t a_t h_prev
                gB = tl.sum(g * Bt[:, None], 0)
                out = b * L + t
                tl.store(du_ptr + r * s_dd + b * s_db + t * s_dt + d,
                         (delta * gB + Dv * dy).to(du_ptr.dtype.element_ty))
                ddelta = (u * gB + tl.sum(decayed * A2, 0) * LN2) * tl.sigmoid(delta_in)
                tl.store(ddelta_ptr + (r * tl.num_programs(0) * L + out) * E + d,
                         ddelta.to(ddelta_ptr.dtype.element_ty))
                tl.store(dbc_row + t * 2 * N, _channel_sums(g * du_dx[None, :], N, LOG_N, BD, PTX), mask=sums_out)
                dA += decayed * delta[None, :]
                dD += dy * u
                dbias += ddelta
                tl.store(dz_ptr + b * s_xb + t * s_xt + d, (dout_z * y * sig_z * (1.0 + z * (1.0 - sig_z))).to(
                    dz_ptr.dtype.element_ty), mask=first)
                tl.store(out_z_ptr + out * E + d, (y * z * sig_z).to(out_z_ptr.dtype.element_ty), mask=first)
            tl.debug_barrier()
    dparams = dparams_ptr + b * (N + 2) * 2 * E   # (Bt, N + 2, 2E): [dA (N rows) ; dD ; ddelta_bias]
    tl.store(dparams + tile, dA)
    tl.store(dparams + N * 2 * E + ch, dD)
    tl.store(dparams + (N + 1) * 2 * E + ch, dbias)


_scan_fwd, _scan_bwd = Launcher(_scan_fwd_kernel), Launcher(_scan_bwd_kernel)


def supports(channels, d_state):
    """Whether these kernels take a mixer with ``channels`` (both directions, 2E) and ``d_state``."""
    return channels % (2 * CHANNELS) == 0 and d_state in (4, 8, 16, 32)


def _strides(u, delta, BC, z):
    if delta.stride(3) != 1 or z.stride(2) != 1 or u.stride() != delta.stride():
        raise ValueError("the scan reads rows of contiguous channels (stride 1 there in delta and z), "
                         "and u in delta's layout")
    return (delta.stride(0), delta.stride(1), delta.stride(2), *BC.stride()[:3], z.stride(0), z.stride(1))


def bc_rows(BC):
    """BC as the kernels read it, 128 bits at a time: float32 rows of 2N contiguous values at 16-byte aligned
    addresses. A float32 slice of x_dbl is that already when its row length and offset are multiples of 4;
    anything else is copied."""
    if (BC.dtype == torch.float32 and BC.stride(3) == 1 and all(s % 4 == 0 for s in BC.stride()[:3])
            and BC.data_ptr() % 16 == 0):
        return BC
    return BC.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _check(u, delta, A, BC, z):
    _, bt, length, e = u.shape
    n = A.shape[1]
    if u.shape != delta.shape or u.shape[0] != 2 or z.shape != (bt, length, e) or A.shape != (2 * e, n):
        raise ValueError(f"scan inputs do not fit u {tuple(u.shape)}: delta {tuple(delta.shape)}, "
                         f"z {tuple(z.shape)}, A {tuple(A.shape)}")
    if BC.shape != (2, bt, length, 2 * n):
        raise ValueError(f"BC must be (2, {bt}, {length}, {2 * n}) ([B | C] per token), got {tuple(BC.shape)}")
    if e % CHANNELS:
        raise ValueError(f"channels per direction ({e}) must be a multiple of {CHANNELS}")
    if n not in (4, 8, 16, 32):
        raise ValueError(f"d_state must be 4, 8, 16 or 32 (a power of two) for the Triton scan, got {n}")
    return bt, length, e, n


def _params(A, D, delta_bias):
    """A as the kernels read it, stored (N, 2E), D and the delta bias, float32 and contiguous. The kernels take only
    their addresses, so an A stored that way already (A.float().t().contiguous().t(), as models_mamba.stacked_params
    keeps it) and float32 D and bias pass as they are, without the host time of the conversions' calls."""
    if not (A.dtype == torch.float32 and A.stride() == (1, A.shape[0])):
        A = A.float().t().contiguous()
    return A, *(t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
                for t in (D, delta_bias))


def scan_fwd(u, delta, BC, z, A, D, delta_bias):
    """-> (y float32, out_z in u's dtype, states); shapes and math in the module docstring."""
    bt, length, e, n = _check(u, delta, A, BC, z)
    BC = bc_rows(BC)
    n_states = cdiv(length, STATE_CHUNK) - 1
    y = torch.empty(bt, length, e, device=u.device, dtype=torch.float32)
    out_z = torch.empty(bt, length, e, device=u.device, dtype=u.dtype)
    states = torch.empty(bt, 2, n_states, n, e, device=u.device, dtype=torch.float32)
    _scan_fwd[(bt, e // CHANNELS)](
        u, delta, BC, z, *_params(A, D, delta_bias), y, out_z, states, length, n_states,
        *_strides(u, delta, BC, z), E=e, N=n, BD=CHANNELS, S=STATE_CHUNK, PTX=PTX, num_warps=1)
    return y, out_z, states


def scan_bwd(u, delta, BC, z, A, D, delta_bias, dout_z, y, states, dz):
    """Gradients of scan_fwd's out_z for its gradient dout_z (Bt, L, E); y and states as scan_fwd returned
    them. dz (z's shape, contiguous channels) receives z's gradient. Returns (du (2, Bt, L, E), ddelta (2, Bt, L, E),
    dA (2E, N), dB and dC together (2, Bt, L, 2N) float32, dD (2E), ddelta_bias (2E), out_z recomputed);
    ddelta is the gradient of delta_raw."""
    bt, length, e, n = _check(u, delta, A, BC, z)
    BC = bc_rows(BC)
    n_chunks = cdiv(length, STATE_CHUNK)
    if states.shape != (bt, 2, n_chunks - 1, n, e):
        raise ValueError(f"states of shape {tuple(states.shape)} do not match the inputs "
                         f"(expected {(bt, 2, n_chunks - 1, n, e)} from scan_fwd)")
    if dz.shape != z.shape or dz.stride(2) != 1 or dout_z.shape != z.shape or dout_z.stride(2) != 1:
        raise ValueError("dz and dout_z must be (Bt, L, E) with contiguous channels")
    blocks = e // CHANNELS
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty_like(u)   # u's strides: the kernel writes it with them
    ddelta = torch.empty(2, bt, length, e, device=u.device, dtype=delta.dtype)
    out_z = torch.empty(bt, length, e, device=u.device, dtype=u.dtype)
    piece = PIECE.get(u.element_size(), STATE_CHUNK)
    scratch = torch.empty(bt * 2 * blocks, piece, n, CHANNELS, **f32)
    dparams = torch.empty(bt, n + 2, 2 * e, **f32)   # per batch row: dA (stored (N, 2E)), dD, ddelta_bias
    dbc = torch.empty(2, blocks, bt, length, 2 * n, **f32)
    _scan_bwd[(bt, 2, blocks)](
        u, delta, BC, z, *_params(A, D, delta_bias), dout_z, y, states, scratch, du, ddelta, dz, out_z,
        dparams, dbc, length, n_chunks, *_strides(u, delta, BC, z), dout_z.stride(0), dout_z.stride(1),
        dz.stride(0), dz.stride(1), E=e, N=n, LOG_N=n.bit_length() - 1, BD=CHANNELS, S=STATE_CHUNK, T=piece,
        PTX=PTX,
        num_warps=1)
    dparams = dparams.sum(0)
    return (du, ddelta, dparams[:n].t().to(A.dtype), dbc.sum(1), dparams[n].to(D.dtype),
            dparams[n + 1].to(delta_bias.dtype), out_z)


def scan_ref(u, delta, BC, z, A, D, delta_bias):
    """scan_fwd's (y, out_z) step by step in float32 (float64 for float64 inputs), for tests and as the
    definition: each direction its own loop over the tokens."""
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    _, bt, length, e = u.shape
    n = A.shape[1]
    y = torch.zeros(bt, length, e, dtype=ct, device=u.device)
    for r, steps in ((0, range(length)), (1, range(length - 1, -1, -1))):
        ch = slice(r * e, (r + 1) * e)
        A_r, D_r = A[ch].to(ct), D[ch].to(ct)
        h = torch.zeros(bt, e, A.shape[1], dtype=ct, device=u.device)
        for t in steps:
            dt = torch.nn.functional.softplus(delta[r, :, t].to(ct) + delta_bias[ch].to(ct))
            u_t = u[r, :, t].to(ct)
            h = torch.exp(dt[..., None] * A_r) * h + (dt * u_t)[..., None] * BC[r, :, t, None, :n].to(ct)
            y[:, t] += (h * BC[r, :, t, None, n:].to(ct)).sum(-1) + D_r * u_t
    return y, (y * torch.nn.functional.silu(z.to(ct))).to(u.dtype)
