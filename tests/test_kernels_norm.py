"""kernels/norm.py (the residual add + RMSNorm in front of each layer) against the formula in float64, and
models_mamba's autograd Function on it against the model's torch path (timm's drop path, F.rms_norm). Without
CUDA the kernels run in Triton's interpreter (tests/conftest.py)."""
import pytest
import torch

import models_mamba
import ssm_ops

pytestmark = pytest.mark.skipif(not ssm_ops.TRITON_AVAILABLE, reason="needs Triton")

from kernels import norm as kn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _case(dtype, c, with_residual, with_scale, batch=3, tokens=7):
    """hidden in ``dtype``, a float32 residual, a drop-path factor with one sample dropped and the others scaled
    by 1 / keep, a weight away from 1, and the gradients of both outputs."""
    g = torch.Generator().manual_seed(c)
    hidden = torch.randn(batch, tokens, c, generator=g).to(dtype)
    residual = torch.randn(batch, tokens, c, generator=g) if with_residual else None
    scale = torch.tensor([1 / 0.75, 0.0, 1 / 0.75])[:batch] if with_scale else None
    weight = 1 + 0.5 * torch.randn(c, generator=g)
    dnormed = torch.randn(batch, tokens, c, generator=g).to(dtype)
    dres = torch.randn(batch, tokens, c, generator=g)
    return hidden, residual, scale, weight, dnormed, dres


def _reference(hidden, residual, scale, weight, dnormed, dres):
    """Outputs and gradients from the definition, in float64 with autograd; the stream rounded to its dtype
    before the norm reads it, as it is stored."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    r = None if residual is None else residual.double().requires_grad_()
    x = h if scale is None else h * scale.double()[:, None, None]
    if r is not None:
        x = x + r
    res_dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    x = x + (x.detach().to(res_dtype).double() - x.detach())   # the rounding, with the gradient of identity
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
    ((normed * dnormed.double()).sum() + (x * dres.double()).sum()).backward()
    return normed.detach(), x.detach(), h.grad, None if r is None else r.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [5, 48])
@pytest.mark.parametrize("with_residual, with_scale", [(True, True), (True, False), (False, False)])
def test_add_norm_kernels_against_float64(dtype, c, with_residual, with_scale, one_thread):
    """21 rows (programs of 4 rows leave the last one partly empty), channels not a power of two."""
    hidden, residual, scale, weight, dnormed, dres = _case(dtype, c, with_residual, with_scale)
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    normed, res, rstd = kn.add_norm_fwd(on(hidden), on(residual), on(weight), on(scale), EPS, dtype)
    dh, dr, dw = kn.add_norm_bwd(on(dnormed), on(dres), res, rstd, on(weight), on(scale), with_residual, dtype)
    want_normed, want_res, want_dh, want_dr, want_dw = _reference(hidden, residual, scale, weight, dnormed, dres)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert normed.dtype == dtype and dh.dtype == dtype and dw.dtype == torch.float32
    assert res.dtype == (dtype if residual is None else torch.float32)
    # one float32 add rounds as the float64 sum rounded does; with the factor there are two roundings
    torch.testing.assert_close(res.cpu().double(), want_res, **(dict(rtol=1e-6, atol=1e-6) if with_scale else dict(rtol=0, atol=0)))
    torch.testing.assert_close(normed.cpu().double(), want_normed, **tol)
    torch.testing.assert_close(dh.cpu().double(), want_dh, **tol)
    torch.testing.assert_close(dw.cpu().double(), want_dw, rtol=1e-4, atol=1e-4)
    if with_residual:
        torch.testing.assert_close(dr.cpu().double(), want_dr, rtol=1e-5, atol=1e-5)
    else:
        assert dr is None
    if with_scale:
        assert dh[1].abs().max() == 0   # the dropped sample


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_function_matches_the_torch_path(with_residual, one_thread, monkeypatch):
    """models_mamba._AddNorm (the CUDA path of add_norm) against add_norm's torch ops, drop path off: the same
    outputs, and the same gradients for hidden, residual and the norm's weight, also when the residual' output
    has no gradient (the final norm)."""
    hidden, residual, _, weight, dnormed, dres = (None if t is None else t.to(DEVICE)
                                                  for t in _case(torch.float32, 48, with_residual, False))
    norm = models_mamba.RMSNorm(48).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
    monkeypatch.setattr(models_mamba, "_use_norm_kernels", lambda x: False)   # add_norm on torch ops, on CUDA too
    results = []
    for kernel in (True, False):
        h = hidden.clone().requires_grad_()
        r = None if residual is None else residual.clone().requires_grad_()
        norm.weight.grad = None
        if kernel:
            normed, res = models_mamba._AddNorm.apply(h, r, norm.weight, None, norm.eps, torch.float32)
        else:
            normed, res = models_mamba.add_norm(norm, torch.nn.Identity(), h, r, torch.float32)
        loss = (normed * dnormed).sum() + (res * dres).sum() if with_residual else (normed * dnormed).sum()
        loss.backward()
        results.append((normed.detach(), res.detach(), h.grad, None if r is None else r.grad, norm.weight.grad))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_drop_scale_is_timms_drop_path():
    """The per-sample factor add_norm's kernels take drops and rescales the samples timm's DropPath would, with
    the same random numbers, and is None where DropPath is the identity."""
    drop = models_mamba.DropPath(0.4)
    x = torch.randn(64, 3, 5)
    torch.manual_seed(7)
    want = drop(x)
    torch.manual_seed(7)
    scale = models_mamba._drop_scale(drop, x)
    assert 0 < (scale == 0).sum() < 64
    torch.testing.assert_close(x * scale[:, None, None], want, rtol=1e-6, atol=0)
    drop.eval()
    assert models_mamba._drop_scale(drop, x) is None
    assert models_mamba._drop_scale(torch.nn.Identity(), x) is None
