"""Kernel dispatch for Vim's bidirectional Mamba mixer ("bimamba v2", outputs divided by 2).

One narrow function, a reference and two kernel backends:

    bimamba_inner(hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, gemm, backend)
        -> (B, L, Dm)

* ``torch``: a pure-PyTorch reference written from the recurrence (any device, any dtype, plain autograd).
* ``triton`` and ``cuda``: a conv kernel and a selective-scan kernel inside one autograd Function each.
  ``triton`` (BiMambaTritonFn) runs kernels/conv.py and kernels/scan.py token-major: direction 1 is read
  backwards in place, and a layer's cost follows its token count, so fused layers get cheaper token by token.
  ``cuda`` (BiMambaInnerFn) runs causal-conv1d's conv and mamba-ssm's scan (cost in steps of powers of two in
  the length) channel-major with the flipped direction copied by torch, as the authors' code does. Both run
  the two directions in one scan call and recompute the conv output and delta in the backward pass instead
  of storing them, as mamba-ssm's own ``mamba_inner_fn`` does; so a layer keeps only xz, the scan output
  before the gate, the small x_proj output and the scan's kept states for its backward pass.

Math (spec section 6), with the parameters of the two directions stacked along the channel axis
(forward direction first, E channels each):
    x, z   = xz[:, :E], xz[:, E:]                                       # (B, E, L)
    xs, zs = [x ; flip(x)], [z ; flip(z)]                               # (B, 2E, L)
    u      = SiLU(causal depthwise conv(xs, conv_w, conv_b))            # kernel W, left padding W-1
    [dt_low | B | C] = x_proj_w[g] @ u[g]                               # per direction g
    delta  = softplus(dt_proj_w[g] @ dt_low + dt_bias);  A = -exp(A_log)
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  y = y * SiLU(zs)
    out    = out_proj_w @ (y[:, :E] + flip(y[:, E:])) / 2

Nothing of mamba-ssm, causal-conv1d or Triton is imported on a machine without them.
"""
import warnings

import torch
import torch.nn.functional as F

# Optional packages; the reference path needs none of them.
try:
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    CONV_AVAILABLE = True
except ImportError:
    CONV_AVAILABLE = False
try:
    import selective_scan_cuda
    MAMBA_SCAN_AVAILABLE = True
except ImportError:
    MAMBA_SCAN_AVAILABLE = False
try:
    from kernels import conv as conv_kernels, scan as scan_kernels
    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_BACKENDS = {  # backend -> (available, what it needs)
    "triton": (TRITON_AVAILABLE, "Triton"),
    "cuda": (CONV_AVAILABLE and MAMBA_SCAN_AVAILABLE, "mamba-ssm and causal-conv1d"),
}
KERNELS_AVAILABLE = any(ok for ok, _ in KERNEL_BACKENDS.values())
INSTALL_HINT = ("pip install causal-conv1d mamba-ssm --no-build-isolation (versions matching your torch and CUDA; "
                "see README 'Install')")
_warned_no_kernels = False


def check_backend(name):
    """Validate an ``ssm_backend`` setting at model construction."""
    if name not in BACKENDS:
        raise ValueError(f"ssm_backend must be one of {BACKENDS}, got {name!r}")
    if name in KERNEL_BACKENDS and not KERNEL_BACKENDS[name][0]:
        raise ValueError(f"ssm_backend={name!r} needs {KERNEL_BACKENDS[name][1]}, which are not importable here. "
                         f"Install them ({INSTALL_HINT}) or use ssm_backend='torch'.")


def _triton_supports(channels, d_state):
    """Whether kernels/ take a mixer with ``channels`` (both directions, 2E) and ``d_state``."""
    return scan_kernels.supports(channels, d_state) and (channels // 2) % conv_kernels.CONV_CHANNELS == 0


def resolve_backend(name, tensor, channels=None, d_state=None):
    """'triton', 'cuda' or 'torch' for an input tensor; 'auto' takes the kernels on CUDA tensors when
    installed, the Triton ones first unless they don't take the mixer's shape (channels = 2E, d_state)."""
    global _warned_no_kernels
    if name == "torch":
        return "torch"
    if name in KERNEL_BACKENDS:
        if not tensor.is_cuda:
            raise RuntimeError(f"ssm_backend={name!r} needs CUDA tensors, got a tensor on {tensor.device}")
        return name
    if not tensor.is_cuda:
        return "torch"
    for backend, (ok, _) in KERNEL_BACKENDS.items():
        if ok and (backend != "triton" or channels is None or _triton_supports(channels, d_state)):
            return backend
    if not _warned_no_kernels:
        warnings.warn("\n" + "!" * 80 + "\nRunning Vision Mamba on CUDA WITHOUT kernels (Triton, or mamba-ssm + "
                      "causal-conv1d): the pure-PyTorch selective scan is a slow Python loop over tokens and "
                      "stores every state. "
                      f"Install the kernels: {INSTALL_HINT}\n" + "!" * 80, stacklevel=3)
        _warned_no_kernels = True
    return "torch"


# ----------------------------------------------------------------------------- reference implementation

def causal_conv1d_ref(x, weight, bias):
    """SiLU(causal depthwise conv). x: (B, D, L); weight: (D, W); bias: (D,) -> (B, D, L)."""
    width = weight.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype), padding=width - 1, groups=x.shape[1])
    return F.silu(y[..., :x.shape[-1]])


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """The selective scan, step by step, in float32 (or float64 for float64 inputs).

    u, delta, z: (Bt, Dc, L); A: (Dc, N); B, C: (Bt, G, N, L), channel d uses group d // (Dc // G);
    D, delta_bias: (Dc,). delta is passed through softplus(delta + delta_bias); the output is gated by
    SiLU(z) unless z is None. Returns (Bt, Dc, L) in u's dtype.
    """
    dtype = u.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    u = u.to(ct)
    delta = F.softplus(delta.to(ct) + delta_bias.to(ct)[:, None])
    per_group = u.shape[1] // B.shape[1]
    Bx = B.to(ct).repeat_interleave(per_group, dim=1)  # (Bt, Dc, N, L)
    Cx = C.to(ct).repeat_interleave(per_group, dim=1)
    decay = torch.exp(delta.unsqueeze(2) * A.to(ct).unsqueeze(-1))  # (Bt, Dc, N, L)
    drive = (delta * u).unsqueeze(2) * Bx
    h = torch.zeros_like(decay[..., 0])
    ys = []
    for t in range(u.shape[-1]):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype)


def mirror_ref(src, parts):
    """(B, P*E, L) -> P tensors (B, 2E, L): each part followed by itself flipped along L."""
    return tuple(torch.cat([a, a.flip(-1)], 1) for a in src.chunk(parts, dim=1))


def fold_ref(src, out=None):
    """(B, 2E, L) [forward ; backward direction in flipped order] -> (B, E, L) = forward + flip(backward)."""
    fwd, bwd = src.chunk(2, dim=1)
    return torch.add(fwd, bwd.flip(-1), out=out)


def _samples_per_gemm(batch, length, tokens=256):
    """How many samples one weight-gradient GEMM of BiMambaTritonFn reduces over: the largest power of two that
    divides the batch and keeps the GEMM at most ``tokens`` tokens long (at least 1). A fused layer's shorter
    sequences thus keep the unfused GEMMs' length, and the partial sums their batch sum reads shrink with the
    tokens instead of staying one per sample."""
    g = 1
    while batch % (2 * g) == 0 and 2 * g * length <= tokens:
        g *= 2
    return g


def weight_gradients(dout, out_z, ddelta, x_dbl, dx_dbl, u, rank, g):
    """BiMambaTritonFn's weight gradients from its token-major tensors: dout (B, L, Dm), out_z (B, L, E), ddelta and
    u (2, B, L, E), x_dbl and dx_dbl (2, B*L, K) -> (out_proj's for out_z (Dm, E), dt_proj's (2, E, rank), x_proj's
    (2, K, E)), in at least float32. They reduce over batch and length: one GEMM per group of g samples (reducing
    over their g*L tokens) and a sum over the groups keep the whole GPU busy, where one GEMM with K = B*L would be
    skinny (scripts/wgrad_benchmark.py)."""
    b, l, dm = dout.shape
    e, k = u.shape[-1], x_dbl.shape[-1]
    p, gl = b // g, g * l   # groups per direction, tokens per group
    acc = torch.promote_types(dout.dtype, torch.float32)
    # bmm on explicit 3-d views (matmul would add expand / reshape calls); the direction-major groups of ddelta,
    # dx_dbl and u summed over their group axis in place of a transpose
    return (torch.bmm(dout.reshape(p, gl, dm).mT, out_z.reshape(p, gl, e)).sum(0, dtype=acc),
            torch.bmm(ddelta.reshape(2 * p, gl, e).mT, x_dbl.view(2 * p, gl, k)[..., :rank])
            .view(2, p, e, rank).sum(1, dtype=acc),
            torch.bmm(dx_dbl.view(2 * p, gl, k).mT, u.reshape(2 * p, gl, e)).view(2, p, k, e).sum(1, dtype=acc))


def _batch_sum(t):
    """Sum over the leading (batch) axis, in at least float32: per-sample weight-gradient partials."""
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32))


def _project(u, x_proj_w, dt_proj_w, d_state):
    """u: (B, 2E, L) -> x_dbl (B, 2, R+2N, L), delta (B, 2E, L) before bias/softplus, B and C (B, 2, N, L)."""
    b, e2, l = u.shape
    x_dbl = torch.matmul(x_proj_w, u.view(b, 2, e2 // 2, l))
    return (x_dbl,) + _split_x_dbl(x_dbl, dt_proj_w, d_state)


def _split_x_dbl(x_dbl, dt_proj_w, d_state):
    b, _, k, l = x_dbl.shape
    rank = k - 2 * d_state
    delta = torch.matmul(dt_proj_w, x_dbl[:, :, :rank]).reshape(b, -1, l)
    return delta, x_dbl[:, :, rank:rank + d_state].contiguous(), x_dbl[:, :, rank + d_state:].contiguous()


def bimamba_inner_ref(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w):
    """Reference bimamba v2 inner function; shapes as in the module docstring:
    xz (B, 2E, L), conv_w (2E, W), conv_b (2E), x_proj_w (2, R+2N, E), dt_proj_w (2, E, R), dt_bias (2E),
    A (2E, N), D (2E), out_proj_w (Dm, E) -> (B, L, Dm)."""
    xs, zs = mirror_ref(xz, 2)
    u = causal_conv1d_ref(xs, conv_w, conv_b)
    _, delta, Bm, Cm = _project(u, x_proj_w, dt_proj_w, A.shape[-1])
    y = selective_scan_ref(u, delta, A, Bm, Cm, D, zs, dt_bias)
    return F.linear(fold_ref(y).transpose(1, 2), out_proj_w * 0.5)


# ----------------------------------------------------------------------------- CUDA kernels
# Thin wrappers with the kernels' calling conventions; tests swap them for emulations built on the
# reference to check the Function's plumbing on the CPU.

def _conv_fwd(x, weight, bias):
    return causal_conv1d_fwd_function(x, weight, bias, None, None, None, True)


def _conv_bwd(x, weight, bias, dout):
    dx, dweight, dbias, _ = causal_conv1d_bwd_function(x, weight, bias, dout, None, None, None, None, False, True)
    return dx, dweight, dbias


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias):
    """-> (out before gating, chunk states, out * SiLU(z))."""
    out, states, out_z = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, True)
    return out, states, out_z


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout_z, states, out):
    """-> (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, recomputed out_z)."""
    return selective_scan_cuda.bwd(u, delta, A, B, C, D, z, delta_bias, dout_z, states, out, None, True, True)


def _channel_major(b, c, l, like):
    """An empty (B, C, L) tensor stored as (C, B*L), the layout in which xz leaves the in_proj GEMM."""
    return torch.empty(c, b, l, device=like.device, dtype=like.dtype).transpose(0, 1)


def _flat(t):
    """(B, C, L) stored as (C, B*L) -> that (C, B*L) view."""
    return t.transpose(0, 1).view(t.shape[1], -1)


def _autocast(*tensors):
    """The mixer's GEMM operands in autocast's dtype when autocast is on (custom_fwd does not cast them)."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def gemm_weights(x_proj_w, dt_proj_w, out_proj_w, dtype):
    """BiMambaTritonFn's GEMM operands from its weights (one mixer's, or every mixer's stacked): x_proj_w, dt_proj_w
    and out_proj_w / 2 in ``dtype``, as constants; the Function returns the weights' own gradients, in float32.
    models_mamba.stacked_params makes them for all layers at once: a few kernels per step instead of per layer."""
    with torch.no_grad():
        return x_proj_w.detach().to(dtype), dt_proj_w.detach().to(dtype), (out_proj_w * 0.5).to(dtype)


class BiMambaInnerFn(torch.autograd.Function):
    """bimamba_inner_ref on mamba-ssm's scan and causal-conv1d's conv (``cuda``): channel-major, the flipped
    direction as a copy, both directions in one scan call, conv output and delta recomputed."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w):
        xz, x_proj_w, dt_proj_w, out_proj_w = _autocast(xz, x_proj_w, dt_proj_w, out_proj_w)
        xs, zs = mirror_ref(xz, 2)
        u = _conv_fwd(xs, conv_w, conv_b)
        x_dbl, delta, Bm, Cm = _project(u, x_proj_w, dt_proj_w, A.shape[-1])
        out, states, out_z = _scan_fwd(u, delta, A, Bm, Cm, D, zs, dt_bias)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, x_dbl, states, out)
        b, e2, l = xz.shape
        folded = fold_ref(out_z, _channel_major(b, e2 // 2, l, xz))
        # one GEMM over all B*L tokens, no copy; the /2 folded into the weight
        return F.linear(_flat(folded).t(), out_proj_w * 0.5).view(b, l, -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, x_dbl, states, out = ctx.saved_tensors
        b, e2, l = xz.shape
        e, n = e2 // 2, A.shape[-1]
        rank = x_dbl.shape[2] - 2 * n
        xs, zs = mirror_ref(xz, 2)
        u = _conv_fwd(xs, conv_w, conv_b)
        delta, Bm, Cm = _split_x_dbl(x_dbl, dt_proj_w, n)
        dout = dout.to(xz.dtype)
        dy = torch.matmul((out_proj_w * 0.5).t(), dout.reshape(b * l, -1).t())  # (E, B*L): one GEMM
        dout_z, = mirror_ref(dy.view(e, b, l).transpose(0, 1), 1)
        du, ddelta, dA, dB, dC, dD, ddt_bias, dzs, out_z = _scan_bwd(
            u, delta, A, Bm, Cm, D, zs, dt_bias, dout_z, states, out)
        # Weight gradients reduce over batch and length. As one GEMM per direction they are skinny
        # (K = B*L) and cuBLAS runs them on a handful of SMs; one GEMM per sample (reducing over L) and a
        # sum over the batch keeps the whole GPU busy.
        dout_proj_w = _batch_sum(torch.matmul(dout.transpose(1, 2), fold_ref(out_z).transpose(1, 2))) * 0.5
        ddelta = ddelta.view(b, 2, e, l)
        ddt_proj_w = _batch_sum(torch.matmul(ddelta, x_dbl[:, :, :rank].transpose(2, 3)))
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, :, :rank] = torch.matmul(dt_proj_w.transpose(1, 2), ddelta)
        dx_dbl[:, :, rank:rank + n] = dB
        dx_dbl[:, :, rank + n:] = dC
        u = u.view(b, 2, e, l)
        dx_proj_w = _batch_sum(torch.matmul(dx_dbl, u.transpose(2, 3)))
        du = du.view(b, 2, e, l) + torch.matmul(x_proj_w.transpose(1, 2), dx_dbl)
        dxs, dconv_w, dconv_b = _conv_bwd(xs, conv_w, conv_b, du.view(b, e2, l))
        dxz = torch.empty_like(xz)  # xz's strides: the in_proj GEMM's backward then takes it without a copy
        fold_ref(dxs, dxz[:, :e])
        fold_ref(dzs, dxz[:, e:])
        return dxz, dconv_w, dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA, dD, dout_proj_w


class BiMambaTritonFn(torch.autograd.Function):
    """bimamba_inner_ref on kernels/ (``triton``), token-major: xz (B, L, 2E) as in_proj's GEMM leaves it, no
    flipped copies (direction 1 is read backwards in place), one conv and one scan call for both directions,
    the sum over directions inside the scan; conv output and delta recomputed in backward. Every GEMM reads
    and writes its operands where they lie: u, delta and their gradients are (2, B, L, E), x_dbl (2, B*L, K)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, gemm):
        """gemm: gemm_weights(x_proj_w, dt_proj_w, out_proj_w, xz's dtype), which the GEMMs use; x_proj_w, dt_proj_w
        and out_proj_w themselves only receive their gradients."""
        x_proj_w, dt_proj_w, half_out_proj_w = gemm
        b, l, e2 = xz.shape
        e, n = e2 // 2, A.shape[-1]
        u = conv_kernels.conv_fwd(xz[..., :e], conv_w, conv_b)
        x_dbl = torch.bmm(u.view(2, b * l, e), x_proj_w.transpose(1, 2))
        rank = x_dbl.shape[-1] - 2 * n
        delta = torch.bmm(x_dbl[..., :rank], dt_proj_w.transpose(1, 2)).view(2, b, l, e)
        BC = scan_kernels.bc_rows(x_dbl[..., rank:].view(2, b, l, 2 * n))   # float32 x_dbl: a view; else a copy
        y, out_z, states = scan_kernels.scan_fwd(u, delta, BC, xz[..., e:], A, D, dt_bias)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, half_out_proj_w, x_dbl, BC,
                              states, y)
        return F.linear(out_z, half_out_proj_w)   # the /2 folded into the weight

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, half_out_proj_w, x_dbl, BC, states, y = ctx.saved_tensors
        b, l, e2 = xz.shape
        e, n, k = e2 // 2, A.shape[-1], x_dbl.shape[-1]
        rank = k - 2 * n
        u = conv_kernels.conv_fwd(xz[..., :e], conv_w, conv_b)
        delta = torch.bmm(x_dbl[..., :rank], dt_proj_w.transpose(1, 2)).view(2, b, l, e)
        dout = dout.to(xz.dtype)
        dxz = torch.empty_like(xz)
        dout_z = torch.matmul(dout, half_out_proj_w)
        du, ddelta, dA, dBC, dD, ddt_bias, out_z = scan_kernels.scan_bwd(
            u, delta, BC, xz[..., e:], A, D, dt_bias, dout_z, y, states, dxz[..., e:])
        dx_dbl = torch.cat([torch.bmm(ddelta.view(2, b * l, e), dt_proj_w), dBC.view(2, b * l, 2 * n).to(x_dbl.dtype)],
                           -1)
        dout_proj_w, ddt_proj_w, dx_proj_w = weight_gradients(dout, out_z, ddelta, x_dbl, dx_dbl, u, rank,
                                                              _samples_per_gemm(b, l))
        dout_proj_w = dout_proj_w * 0.5
        du.view(2, b * l, e).baddbmm_(dx_dbl, x_proj_w)
        dconv_w, dconv_b = conv_kernels.conv_bwd(xz[..., :e], conv_w, conv_b, du, dxz[..., :e])
        return dxz, dconv_w, dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA, dD, dout_proj_w, None


def bimamba_inner(hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, gemm=None,
                  backend="auto"):
    """in_proj and the mixer: hidden (B, L, Dm), in_proj_w (2E, Dm), the rest as bimamba_inner_ref -> (B, L, Dm).
    in_proj's GEMM writes xz in the layout the chosen kernels read: token-major for ``triton``, channel-major
    ((2E, B*L) memory seen as (B, 2E, L)) for ``cuda`` and ``torch``. gemm: the Triton Function's GEMM operands
    (gemm_weights), made here if not given."""
    args = (conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w)
    backend = resolve_backend(backend, hidden, *A.shape)
    if backend == "triton":
        xz = F.linear(hidden, in_proj_w)
        return BiMambaTritonFn.apply(xz, *args, gemm or gemm_weights(x_proj_w, dt_proj_w, out_proj_w, xz.dtype))
    b, l, _ = hidden.shape
    xz = (in_proj_w @ hidden.reshape(b * l, -1).t()).view(-1, b, l).permute(1, 0, 2)
    if backend == "torch":
        return bimamba_inner_ref(xz, *args)
    return BiMambaInnerFn.apply(xz, *args)
