"""kernels/scan.py and kernels/conv.py against float64 references built independently of them: the
channel-major selective_scan_ref / causal_conv1d_ref of ssm_ops applied to each direction's flipped copy,
as the authors' code lays the two directions out, and autograd through them. Without CUDA the kernels run in
Triton's interpreter (tests/conftest.py), so the same code is checked on the CPU."""
import pytest
import torch
import torch.nn.functional as F

import ssm_ops

pytestmark = pytest.mark.skipif(not ssm_ops.TRITON_AVAILABLE, reason="needs Triton")

from kernels import conv as kconv, scan as kscan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S = kscan.STATE_CHUNK
NAMES = ("u", "delta", "BC", "z", "A", "D", "delta_bias")


def rel(a, b):
    return ((a.double().cpu() - b.double()).norm() / b.double().norm()).item()


def inputs(b, e, n, length, seed, rank=3):
    """Token-major scan inputs; BC is a slice of x_dbl rows (2, b, L, rank + 2n), z of xz rows, as in the mixer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x_dbl, xz = r(2, b, length, rank + 2 * n), r(b, length, 2 * e)
    return dict(u=r(2, b, length, e), delta=r(2, b, length, e) * 0.5 - 1.0, BC=x_dbl[..., rank:], z=xz[..., e:],
                A=-torch.rand(2 * e, n, generator=g) * 2 - 0.1, D=r(2 * e),
                delta_bias=r(2 * e) * 0.3)


def reference(x):
    """(y, out_z) in float64 from ssm_ops.selective_scan_ref on [direction 0 ; direction 1 flipped] (B, 2E, L)."""
    u, delta, BC, z, A, D, bias = (x[k] for k in NAMES)
    n = A.shape[1]
    B, C = BC[..., :n], BC[..., n:]

    def cm(t):  # (2, b, L, c) -> (b, 2c, L) with direction 1 flipped along L
        return torch.cat([t[0], t[1].flip(1)], 2).transpose(1, 2)
    y = ssm_ops.selective_scan_ref(cm(u), cm(delta), A, torch.stack([B[0], B[1].flip(1)], 1).transpose(2, 3),
                                   torch.stack([C[0], C[1].flip(1)], 1).transpose(2, 3), D, None, bias)
    e = y.shape[1] // 2
    y = (y[:, :e] + y[:, e:].flip(-1)).transpose(1, 2)
    return y, y * F.silu(z)


def run(x, dout_z):
    dev = {k: v.to(DEVICE) for k, v in x.items()}
    y, out_z, states = kscan.scan_fwd(*(dev[k] for k in NAMES))
    b, length, e = x["z"].shape
    dz = torch.full((b, length, 2 * e), float("nan"), device=DEVICE)[..., e:]   # z's place in dxz
    got = kscan.scan_bwd(*(dev[k] for k in NAMES), dout_z.to(DEVICE), y, states, dz)
    du, ddelta, dA, dbc, dD, dbias, out_z2 = got
    grads = dict(u=du, delta=ddelta, BC=dbc, z=dz, A=dA, D=dD, delta_bias=dbias)
    return y, out_z, states, grads, out_z2


@pytest.mark.parametrize("b, e, n, length", [
    (2, 32, 4, 2 * S + 3),     # three backward chunks, the last partial; odd length: a middle token
    (1, 32, 16, 2 * S),        # exactly two, Vim's d_state; even length
    (2, 64, 8, S - 3),         # shorter than one chunk (in pieces of 8: a whole piece, a partial one); two blocks
    (1, 32, 4, 1),             # one token: both directions meet on it
])
@pytest.mark.parametrize("piece", [S, 8])   # float32's whole chunks; 16-bit sequences' pieces (kernels.scan.PIECE)
def test_scan_matches_float64_reference_and_autograd(b, e, n, length, piece, monkeypatch):
    monkeypatch.setitem(kscan.PIECE, 4, piece)
    x = inputs(b, e, n, length, seed=length)
    leaves = {k: v.double().requires_grad_() for k, v in x.items()}
    ref_y, ref_z = reference(leaves)
    dout_z = torch.randn(ref_z.shape, generator=torch.Generator().manual_seed(1))
    want = dict(zip(NAMES, torch.autograd.grad(ref_z, [leaves[k] for k in NAMES], dout_z.double())))
    y, out_z, states, grads, out_z2 = run(x, dout_z)
    assert y.dtype == torch.float32 and states.shape == (b, 2, -(-length // S) - 1, n, e)
    assert rel(y, ref_y) < 1e-5 and rel(out_z, ref_z) < 1e-5
    for name in NAMES:
        assert grads[name].shape == want[name].shape, name
        if want[name].norm() > 0:  # dA is 0 for one token (no state before it)
            assert rel(grads[name], want[name]) < 1e-5, (name, rel(grads[name], want[name]))
    assert rel(out_z2, ref_z) < 1e-5  # out_z recomputed for the out_proj weight gradient


def test_bfloat16_scan_matches_float64_reference():
    """bfloat16 sequences (float32 A, D, delta bias, as the model passes them): outputs and gradients match the
    float64 reference of the same rounded inputs to bfloat16 output precision."""
    x = {k: v.to(torch.bfloat16) if k in ("u", "delta", "BC", "z") else v
         for k, v in inputs(2, 32, 4, S + 5, seed=11).items()}
    leaves = {k: v.double().requires_grad_() for k, v in x.items()}
    _, ref_z = reference(leaves)
    dout_z = torch.randn(ref_z.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = torch.autograd.grad(ref_z, [leaves[k] for k in NAMES], dout_z.double())
    _, out_z, _, grads, _ = run(x, dout_z)
    assert out_z.dtype == torch.bfloat16 and rel(out_z, ref_z) < 1e-2
    for name, grad in zip(NAMES, want):
        assert grads[name].shape == grad.shape, name
        assert rel(grads[name], grad) < 1e-2, (name, rel(grads[name], grad))


def test_scan_reads_every_layout_of_A_and_BC_alike():
    """A stored (N, 2E) as models_mamba hands it over, or row-major; BC a float32 x_dbl slice whose rows the
    kernels read in place (row length and offset multiples of 4) or one they copy (odd offset): the
    same numbers give the same outputs and gradients, and only the aligned float32 slice is read in place."""
    x = inputs(1, 32, 4, S + 3, seed=3, rank=4)            # x_dbl rows of 4 + 8 floats, B/C at offset 4
    assert kscan.bc_rows(x["BC"]).data_ptr() == x["BC"].data_ptr()
    odd = inputs(1, 32, 4, S + 3, seed=3, rank=3)["BC"]    # offset 3: not 16-byte aligned
    odd.copy_(x["BC"])
    assert kscan.bc_rows(odd).data_ptr() != odd.data_ptr() and kscan.bc_rows(odd).is_contiguous()
    dout_z = torch.randn(x["z"].shape, generator=torch.Generator().manual_seed(4))
    base = run(x, dout_z)
    for variant in (dict(A=x["A"].t().contiguous().t()), dict(BC=odd)):
        got = run({**x, **variant}, dout_z)
        assert torch.equal(got[1], base[1]) and all(torch.equal(got[3][k], base[3][k]) for k in NAMES)


def test_scan_ref_is_the_same_recurrence():
    """kernels/scan.py's own step-by-step reference agrees with the flipped-copy composition."""
    x = {k: v.double() for k, v in inputs(2, 32, 4, 9, seed=5).items()}
    y, out_z = kscan.scan_ref(*(x[k] for k in NAMES))
    want_y, want_z = reference(x)
    assert torch.allclose(y, want_y, rtol=1e-12, atol=1e-12) and torch.allclose(out_z, want_z, rtol=1e-12, atol=1e-12)


def test_scan_rejects_bad_shapes():
    x = inputs(1, 32, 6, 10, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        kscan.scan_fwd(*(x[k].to(DEVICE) for k in NAMES))
    x = inputs(1, kscan.CHANNELS + 8, 4, 10, seed=0)  # a direction's channels don't fill programs
    with pytest.raises(ValueError, match="multiple of"):
        kscan.scan_fwd(*(x[k].to(DEVICE) for k in NAMES))
    x = {k: v.to(DEVICE) for k, v in inputs(1, 32, 4, 10, seed=0).items()}
    y, _, states = kscan.scan_fwd(*(x[k] for k in NAMES))
    with pytest.raises(ValueError, match="do not match"):
        kscan.scan_bwd(*(x[k] for k in NAMES), torch.ones(1, 10, 32, device=DEVICE), y,
                       torch.zeros(1, 2, 1, 4, 32, device=DEVICE), torch.empty(1, 10, 64, device=DEVICE)[..., 32:])


def conv_reference(x, w, bias):
    """(2, B, L, E) from ssm_ops.causal_conv1d_ref on [x ; flip(x)] channel-major, direction 1 flipped back."""
    e = x.shape[-1]
    xs = x.transpose(1, 2)
    out = ssm_ops.causal_conv1d_ref(torch.cat([xs, xs.flip(-1)], 1), w, bias)
    return torch.stack([out[:, :e], out[:, e:].flip(-1)]).transpose(2, 3)


@pytest.mark.parametrize("length", [1, 5, kconv.CONV_TOKENS + 7])
def test_conv_matches_float64_reference_and_autograd(length):
    g = torch.Generator().manual_seed(length)
    e = 2 * kconv.CONV_CHANNELS
    xz = torch.randn(2, length, 2 * e, generator=g)   # x is the first half of each row, as in the mixer
    w = torch.randn(2 * e, kconv.CONV_WIDTH, generator=g) * 0.5
    bias = torch.randn(2 * e, generator=g)
    dout = torch.randn(2, 2, length, e, generator=g)
    ref_in = [t.double().requires_grad_() for t in (xz[..., :e], w, bias)]
    ref = conv_reference(*ref_in)
    want = torch.autograd.grad(ref, ref_in, dout.double())
    dev = xz.to(DEVICE)
    got = kconv.conv_fwd(dev[..., :e], w.to(DEVICE), bias.to(DEVICE))
    assert got.shape == ref.shape and rel(got, ref) < 1e-6
    assert torch.allclose(kconv.conv_ref(*(t.double() for t in (xz[..., :e], w, bias))), ref.detach(), atol=1e-12)
    dxz = torch.zeros_like(dev)
    dw, db = kconv.conv_bwd(dev[..., :e], w.to(DEVICE), bias.to(DEVICE), dout.to(DEVICE), dxz[..., :e])
    assert not dxz[..., e:].any()   # dx goes into its own half of the rows only
    for name, a, b in zip(("dx", "dweight", "dbias"), (dxz[..., :e], dw, db), want):
        assert a.shape == b.shape and rel(a, b) < 1e-5, name


def test_conv_rejects_other_widths():
    x = torch.randn(1, 8, kconv.CONV_CHANNELS, device=DEVICE)
    with pytest.raises(ValueError, match="width 4"):
        kconv.conv_fwd(x, torch.randn(2 * kconv.CONV_CHANNELS, 3, device=DEVICE),
                       torch.randn(2 * kconv.CONV_CHANNELS, device=DEVICE))
