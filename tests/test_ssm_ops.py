"""The kernel layer: the reference scan against a naive float64 loop, and the kernel-path autograd Function
(both directions in one scan, recomputation in backward) against plain autograd through the reference, with
the CUDA kernels emulated on the CPU by the reference itself."""
import math

import pytest
import torch
import torch.nn.functional as F

import ssm_ops


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Element by element in float64, straight from h_t = exp(dt A) h_{t-1} + dt B_t u_t, y = C.h + D u."""
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1]
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for bi in range(b):
        for di in range(d):
            grp = di // (d // g)
            h = [0.0] * n
            for t in range(l):
                dt = math.log1p(math.exp(delta[bi, di, t].item() + delta_bias[di].item()))
                acc = 0.0
                for k in range(n):
                    h[k] = math.exp(dt * A[di, k].item()) * h[k] + dt * B[bi, grp, k, t].item() * u[bi, di, t].item()
                    acc += C[bi, grp, k, t].item() * h[k]
                out = acc + D[di].item() * u[bi, di, t].item()
                zz = z[bi, di, t].item()
                y[bi, di, t] = out * zz / (1 + math.exp(-zz))
    return y


def random_scan_inputs(b=2, d=4, l=7, n=3, g=2, dtype=torch.float64):
    return dict(u=torch.randn(b, d, l, dtype=dtype), delta=torch.randn(b, d, l, dtype=dtype) * 0.5,
                A=-torch.rand(d, n, dtype=dtype) * 2, B=torch.randn(b, g, n, l, dtype=dtype),
                C=torch.randn(b, g, n, l, dtype=dtype), D=torch.randn(d, dtype=dtype),
                z=torch.randn(b, d, l, dtype=dtype), delta_bias=torch.randn(d, dtype=dtype) * 0.1)


def test_selective_scan_ref_matches_naive_loop():
    torch.manual_seed(0)
    inputs = random_scan_inputs()
    got = ssm_ops.selective_scan_ref(**inputs)
    assert torch.allclose(got, naive_scan(**inputs), rtol=1e-10, atol=1e-12)


def test_selective_scan_ref_float32_close_to_float64():
    torch.manual_seed(1)
    inputs = random_scan_inputs(l=20)
    ref = ssm_ops.selective_scan_ref(**inputs)
    got = ssm_ops.selective_scan_ref(**{k: v.float() for k, v in inputs.items()})
    assert got.dtype == torch.float32
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_causal_conv1d_ref_is_causal_with_left_padding():
    x = torch.randn(1, 2, 6, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)
    bias = torch.randn(2, dtype=torch.float64)
    got = ssm_ops.causal_conv1d_ref(x, w, bias)
    xp = F.pad(x, (3, 0))
    want = torch.stack([(xp[..., t:t + 4] * w).sum(-1) for t in range(6)], -1) + bias[:, None]
    assert torch.allclose(got, F.silu(want))


# --- kernel emulation: the kernels' calling conventions implemented with the reference and autograd

def _emu_conv_fwd(x, w, b):
    return ssm_ops.causal_conv1d_ref(x, w, b)


def _emu_conv_bwd(x, w, b, dout):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    with torch.enable_grad():
        out = ssm_ops.causal_conv1d_ref(x, w, b)
    return torch.autograd.grad(out, (x, w, b), dout)


def _emu_scan_fwd(u, delta, A, B, C, D, z, delta_bias):
    out = ssm_ops.selective_scan_ref(u, delta, A, B, C, D, None, delta_bias)
    states = torch.full((u.shape[0], u.shape[1], 1, 2 * A.shape[1]), float("nan"))  # never read by the emulation
    return out, states, out * F.silu(z)


def _emu_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout_z, states, out):
    args = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
    with torch.enable_grad():
        out_z = ssm_ops.selective_scan_ref(*args)
    grads = torch.autograd.grad(out_z, args, dout_z)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z.detach()


def _function_inputs(dtype):
    b, e, l, n, r, dm, w = 2, 32, 37, 4, 2, 5, 4
    f = dict(dtype=dtype)
    inputs = [torch.randn(b, 2 * e, l, **f), torch.randn(2 * e, w, **f) * 0.5, torch.randn(2 * e, **f),
              torch.randn(2, r + 2 * n, e, **f) * 0.5, torch.randn(2, e, r, **f) * 0.5,
              torch.randn(2 * e, **f) * 0.1, -torch.rand(2 * e, n, **f) - 0.1, torch.randn(2 * e, **f),
              torch.randn(dm, e, **f) * 0.5]
    return inputs, torch.randn(b, l, dm, **f)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.skipif(
    not ssm_ops.TRITON_AVAILABLE, reason="needs Triton"))])
def test_kernel_function_matches_reference_autograd(monkeypatch, backend):
    """Forward and every gradient of the kernel Functions (flips, stacking, recompute, grouped B/C) equal the
    reference composition in float64. 'cuda' (BiMambaInnerFn): the kernels emulated in float64 (exact plumbing
    check); 'triton' (BiMambaTritonFn, token-major): the real Triton kernels (float32 inside; Triton's
    interpreter on the CPU), three scan chunks."""
    if backend == "cuda":
        for name, fn in [("_conv_fwd", _emu_conv_fwd), ("_conv_bwd", _emu_conv_bwd),
                         ("_scan_fwd", _emu_scan_fwd), ("_scan_bwd", _emu_scan_bwd)]:
            monkeypatch.setattr(ssm_ops, name, fn)
    torch.manual_seed(0)
    inputs, dout = _function_inputs(torch.float64 if backend == "cuda" else torch.float32)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = ssm_ops.bimamba_inner_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    fn_in = [t.clone().to(device) for t in inputs]
    if backend == "cuda":  # xz as in_proj makes it for each Function: (2E, B, L) memory, or (B, L, 2E) tokens
        fn_in[0] = fn_in[0].transpose(0, 1).contiguous().transpose(0, 1)
    else:
        fn_in[0] = fn_in[0].transpose(1, 2).contiguous()
    fn_in = [t.requires_grad_() for t in fn_in]
    if backend == "cuda":
        fn_out = ssm_ops.BiMambaInnerFn.apply(*fn_in)
    else:   # the GEMM operands as stacked_params hands them over: constants beside the weights
        fn_out = ssm_ops.BiMambaTritonFn.apply(*fn_in, ssm_ops.gemm_weights(fn_in[3], fn_in[4], fn_in[8], torch.float32))
    fn_grads = list(torch.autograd.grad(fn_out, fn_in, dout.to(device)))
    assert fn_grads[0].stride() == fn_in[0].stride()  # so in_proj's backward takes dxz without a copy
    if backend == "triton":
        fn_grads[0] = fn_grads[0].transpose(1, 2)
    assert fn_out.dtype == inputs[0].dtype

    def close(got, want):  # float64 emulation: elementwise; float32 kernels: relative to the tensor's norm
        got = got.double().cpu()
        if backend == "cuda":
            return torch.allclose(got, want, rtol=1e-9, atol=1e-11)
        return ((got - want).norm() / want.norm()).item() < 1e-5
    assert close(fn_out, ref_out)
    for i, (g_fn, g_ref) in enumerate(zip(fn_grads, ref_grads)):
        assert g_fn.shape == g_ref.shape, i
        assert close(g_fn, g_ref), f"gradient of input {i}"


def test_backend_validation():
    with pytest.raises(ValueError, match="ssm_backend must be one of"):
        ssm_ops.check_backend("mamba")
    for name, (available, needs) in ssm_ops.KERNEL_BACKENDS.items():
        if not available:
            with pytest.raises(ValueError, match=f"needs {needs}, which are not importable"):
                ssm_ops.check_backend(name)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            ssm_ops.resolve_backend(name, torch.zeros(1))
    assert ssm_ops.resolve_backend("auto", torch.zeros(1)) == "torch"


def test_auto_backend_skips_triton_for_shapes_it_does_not_take(monkeypatch):
    class OnCuda:  # resolve_backend only asks where the tensor is
        is_cuda, device = True, "cuda:0"
    monkeypatch.setattr(ssm_ops, "KERNEL_BACKENDS", {"triton": (True, ""), "cuda": (True, "")})
    assert ssm_ops.resolve_backend("auto", OnCuda(), 768, 16) == "triton"      # Vim-Ti
    assert ssm_ops.resolve_backend("auto", OnCuda(), 768, 12) == "cuda"        # d_state not a power of two
    assert ssm_ops.resolve_backend("auto", OnCuda(), 2 * 40, 16) == "cuda"     # E = 40 channels per direction
    monkeypatch.setattr(ssm_ops, "KERNEL_BACKENDS", {"triton": (True, ""), "cuda": (False, "")})
    monkeypatch.setattr(ssm_ops, "_warned_no_kernels", False)
    with pytest.warns(UserWarning, match="WITHOUT"):
        assert ssm_ops.resolve_backend("auto", OnCuda(), 80, 16) == "torch"


def test_weight_gradient_gemms_group_samples_up_to_the_unfused_length():
    # the largest power of two dividing the batch with group * length <= 256 (hand-worked)
    cases = {(128, 197): 1, (128, 129): 1, (128, 128): 2, (128, 99): 2, (128, 64): 4, (128, 36): 4, (128, 29): 8,
             (6, 37): 2, (3, 20): 1, (256, 1): 256}
    assert {case: ssm_ops._samples_per_gemm(*case) for case in cases} == cases


@pytest.mark.parametrize("g", [1, 2, 4])
def test_weight_gradients_equal_their_definition_for_every_grouping(g):
    """ssm_ops.weight_gradients against einsums over batch and tokens (float64), however many samples one GEMM
    takes."""
    torch.manual_seed(0)
    b, l, dm, e, k, rank = 4, 5, 3, 6, 7, 2
    f = dict(dtype=torch.float64)
    dout, out_z = torch.randn(b, l, dm, **f), torch.randn(b, l, e, **f)
    ddelta, u = torch.randn(2, b, l, e, **f), torch.randn(2, b, l, e, **f)
    x_dbl, dx_dbl = torch.randn(2, b * l, k, **f), torch.randn(2, b * l, k, **f)
    got = ssm_ops.weight_gradients(dout, out_z, ddelta, x_dbl, dx_dbl, u, rank, g)
    want = (torch.einsum("btd,bte->de", dout, out_z),
            torch.einsum("rbte,rbtk->rek", ddelta, x_dbl.view(2, b, l, k)[..., :rank]),
            torch.einsum("rbtk,rbte->rke", dx_dbl.view(2, b, l, k), u))
    for a, w in zip(got, want):
        assert a.shape == w.shape and torch.allclose(a, w, rtol=1e-12, atol=1e-12)
