"""Vision Mamba with Famba-V fusion (models_mamba.py) against the spec (sections 3 and 6) and independent
float64 re-implementations of the mixer and of the whole block loop.

Tiny models (32 px images, 8 px patches: 16 patches + class token, depth 4, width 16) keep it fast on a CPU.
"""
import copy
import io
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import models_mamba
import ssm_ops
import token_fusion
from test_token_fusion import naive_fuse

F64 = torch.float64
TI = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
SMALL = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=16, d_state=4, num_classes=5, drop_path_rate=0.0,
            ssm_backend="torch")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return models_mamba.VisionMamba(**{**TINY, **kw})


@pytest.fixture(scope="module")
def vim_ti():
    torch.manual_seed(0)
    return timm.create_model(TI, num_classes=1000)


# ----------------------------------------------------------------------------- independent float64 math

def silu(x):
    return x / (1 + torch.exp(-x))


def softplus(x):
    return torch.log1p(torch.exp(x))


def rmsnorm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def naive_direction(x, z, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D):
    """One scan direction, float64, for one sample: x, z (L, E) -> gated y (L, E)."""
    length, e = x.shape
    width = conv_w.shape[-1]
    rank = dt_w.shape[1]
    n = A_log.shape[1]
    u = torch.zeros(length, e, dtype=F64)
    for t in range(length):  # causal depthwise conv, left padding width - 1
        acc = conv_b.clone()
        for k in range(width):
            s = t - (width - 1) + k
            if s >= 0:
                acc = acc + conv_w[:, 0, k] * x[s]
        u[t] = silu(acc)
    x_dbl = u @ x_proj_w.t()                      # (L, R + 2N): [dt_low | B | C]
    dt_low, Bm, Cm = x_dbl[:, :rank], x_dbl[:, rank:rank + n], x_dbl[:, rank + n:]
    delta = softplus(dt_low @ dt_w.t() + dt_b)    # (L, E)
    A = -torch.exp(A_log)                         # (E, N)
    h = torch.zeros(e, n, dtype=F64)
    y = torch.zeros(length, e, dtype=F64)
    for t in range(length):
        h = torch.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * Bm[t][None, :]
        y[t] = (h * Cm[t][None, :]).sum(-1) + D * u[t]
    return y * silu(z)


def naive_mixer(p, hidden):
    """bimamba v2 mixer in float64 from a dict of its parameters; hidden (B, L, Dm) -> (B, L, Dm)."""
    outs = []
    e = p["in_proj.weight"].shape[0] // 2
    for b in range(hidden.shape[0]):
        xz = hidden[b] @ p["in_proj.weight"].t()  # (L, 2E)
        x, z = xz[:, :e], xz[:, e:]
        y_f = naive_direction(x, z, p["conv1d.weight"], p["conv1d.bias"], p["x_proj.weight"],
                              p["dt_proj.weight"], p["dt_proj.bias"], p["A_log"], p["D"])
        y_b = naive_direction(x.flip(0), z.flip(0), p["conv1d_b.weight"], p["conv1d_b.bias"], p["x_proj_b.weight"],
                              p["dt_proj_b.weight"], p["dt_proj_b.bias"], p["A_b_log"], p["D_b"])
        outs.append(((y_f + y_b.flip(0)) / 2) @ p["out_proj.weight"].t())
    return torch.stack(outs)


def layer_params(sd, i):
    prefix = f"layers.{i}.mixer."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def naive_model(model, images, cls_position, fusion=None):
    """Spec section 6 block loop in float64 with drop-path off. ``fusion`` (r per layer, order, mode) uses the
    naive fusion loop of test_token_fusion (own matching, ordering and class-token tracking).
    Returns (logits, class index per sample after the last layer)."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    images = images.double()
    batch = images.shape[0]
    w = sd["patch_embed.proj.weight"]  # (D, 3, P, P)
    dim, chans, patch, _ = w.shape
    side = images.shape[-1] // patch
    tokens = []
    for gy in range(side):  # row-major patch order
        for gx in range(side):
            crop = images[:, :, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch].reshape(batch, -1)
            tokens.append(crop @ w.reshape(dim, -1).t() + sd["patch_embed.proj.bias"])
    m = len(tokens)
    cls_pos = {"head": 0, "middle": m // 2}[cls_position]
    tokens.insert(cls_pos, sd["cls_token"][0, 0].expand(batch, dim))
    hidden = torch.stack(tokens, 1) + sd["pos_embed"]
    cls = [cls_pos] * batch
    residual, size = None, None
    for i in range(model.depth):
        residual = hidden if residual is None else residual + hidden
        hidden = rmsnorm(residual, sd[f"layers.{i}.norm.weight"])
        if fusion is not None and fusion[0][i]:
            r, order, mode = fusion[0][i], fusion[1], fusion[2]
            hs, rs, cl, ss = [], [], [], []
            for b in range(batch):  # one sample at a time: the naive loop takes a scalar class index
                sz = None if size is None else size[b:b + 1]
                h_b, r_b, c_b, s_b = naive_fuse(hidden[b:b + 1], residual[b:b + 1], r, cls[b], sz, order, mode)
                hs.append(h_b)
                rs.append(r_b)
                cl.append(c_b[0])
                ss.append(torch.tensor(s_b[0]).view(1, -1, 1))
            hidden, residual, cls = torch.cat(hs), torch.cat(rs), cl
            size = torch.cat(ss) if mode == "size" else None
        hidden = naive_mixer(layer_params(sd, i), hidden)
    out = rmsnorm(residual + hidden, sd["norm_f.weight"])
    feats = torch.stack([out[b, cls[b]] for b in range(batch)])
    return feats @ sd["head.weight"].t() + sd["head.bias"], cls


# ----------------------------------------------------------------------------- mixer and model math

def trained_like_mixer():
    """A float64 BiMamba with every parameter moved off its initial value (D = 1, zero dt_proj_b bias ...), so
    that every parameter, and each direction's own twins, shows in the output."""
    torch.manual_seed(0)
    mixer = models_mamba.BiMamba(16, d_state=4, backend="torch").double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


@pytest.mark.parametrize("img_size,patch,stride", [(32, 8, 8), (30, 8, 8), (32, 8, 4)])
def test_patch_embed_equals_the_convolution(img_size, patch, stride):
    """Non-overlapping patches go through a GEMM, others (and a cropped border) through the conv itself:
    output and weight/bias gradients equal F.conv2d's in float64."""
    torch.manual_seed(0)
    embed = models_mamba.PatchEmbed(img_size, patch, stride, in_chans=3, embed_dim=6).double()
    x = torch.randn(2, 3, img_size, img_size, dtype=torch.float64)
    got = embed(x)
    want = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=stride).flatten(2).transpose(1, 2)
    assert got.shape == (2, embed.num_patches, 6)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(
        torch.autograd.grad(got, embed.parameters(), g), torch.autograd.grad(want, embed.parameters(), g)))


def test_bimamba_mixer_matches_naive_float64():
    mixer = trained_like_mixer()
    hidden = torch.randn(2, 11, 16, dtype=F64)
    got = mixer(hidden)
    want = naive_mixer({k: v.detach() for k, v in mixer.state_dict().items()}, hidden)
    assert got.shape == (2, 11, 16)
    # tolerance at float32 level: see test_bimamba_double_is_float64_precise
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-6, err
    # direction matters: swapping the twins changes the result (the check above sees both directions)
    swapped = {k: v.detach() for k, v in mixer.state_dict().items()}
    for a, b in (("A_log", "A_b_log"), ("D", "D_b"), ("dt_proj.bias", "dt_proj_b.bias")):
        swapped[a], swapped[b] = swapped[b], swapped[a]
    assert not torch.allclose(got, naive_mixer(swapped, hidden), rtol=1e-3, atol=1e-4)


def test_padded_dt_rank_leaves_the_mixer_and_its_weight_gradients_unchanged():
    """pad_dt_rank (2-byte GEMMs on the Triton kernels) against the unpadded weights, float64 on the reference
    path: same output, same gradients for the real x_proj / dt_proj weights, zero rows where the padding goes."""
    mixer = trained_like_mixer()   # d_model 16: rank 1, padded to 8
    hidden = torch.randn(2, 11, 16, dtype=F64)
    params = models_mamba.stacked_params([mixer], hidden)[0]
    x_proj_w, dt_proj_w = models_mamba.pad_dt_rank(params[2], params[3])
    rank, n = mixer.dt_rank, mixer.d_state
    assert x_proj_w.shape == (2, 8 + 2 * n, 32) and dt_proj_w.shape == (2, 32, 8)
    assert torch.equal(x_proj_w[:, :rank], params[2][:, :rank]) and torch.equal(x_proj_w[:, 8:], params[2][:, rank:])
    assert not x_proj_w[:, rank:8].any() and not dt_proj_w[..., rank:].any()
    g = torch.randn(2, 11, 16, dtype=F64)
    weights = [mixer.x_proj.weight, mixer.x_proj_b.weight, mixer.dt_proj.weight, mixer.dt_proj_b.weight]
    want = mixer(hidden, params)
    got = mixer(hidden, params[:2] + (x_proj_w, dt_proj_w) + params[4:])
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, weights, g), torch.autograd.grad(want, weights, g)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_bimamba_double_is_float64_precise():
    """BUG REPRODUCTION (precision). BiMamba.forward casts dt_proj.bias, A = -exp(A_log) and D with .float(),
    so a float64 module on the float64 'torch' backend (documented 'any dtype') silently computes those in
    float32 and differs from float64 math by ~1e-7 relative instead of ~1e-15."""
    mixer = trained_like_mixer()
    hidden = torch.randn(2, 11, 16, dtype=F64)
    got = mixer(hidden)
    params = {k: v.detach() for k, v in mixer.state_dict().items()}
    want = naive_mixer(params, hidden)
    err = ((got - want).abs().max() / want.abs().max()).item()
    # diagnosis: rounding exactly those three to float32 in the naive math reproduces the module to ~1e-16
    rounded = dict(params)
    for k in ("D", "D_b", "dt_proj.bias", "dt_proj_b.bias"):
        rounded[k] = params[k].float().double()
    for k in ("A_log", "A_b_log"):
        rounded[k] = torch.exp(params[k].float()).double().log()
    err_rounded = ((got - naive_mixer(rounded, hidden)).abs().max() / want.abs().max()).item()
    assert err < 1e-12, f"relative error {err:.1e} (with A, D, dt bias rounded to float32: {err_rounded:.1e})"


@pytest.mark.parametrize("cls_position", ["head", "middle"])
def test_model_without_fusion_matches_naive_float64(cls_position):
    model = tiny(cls_position=cls_position).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=F64)
    want, cls = naive_model(model, images, cls_position)
    assert cls == [0 if cls_position == "head" else 8] * 2
    got = model(images)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()


@pytest.mark.skipif(not ssm_ops.TRITON_AVAILABLE, reason="needs Triton")
def test_model_on_the_triton_function_equals_float64_torch_path(monkeypatch, matching_margins):
    """The whole model as it runs on CUDA's default kernels (stacked_params' Triton layout and GEMM operands,
    BiMambaTritonFn; Triton's interpreter on the CPU) against the float64 torch path: logits and the gradient of
    every parameter."""
    model = tiny(fusion_strategy="upper", fusion_layer=1, fusion_token=2)
    reference = copy.deepcopy(model).double()
    images = torch.randn(2, 3, 32, 32)
    g = torch.randn(2, 5)
    want = reference(images.double())
    (want * g.double()).sum().backward()
    monkeypatch.setattr(ssm_ops, "resolve_backend", lambda name, tensor, channels=None, d_state=None: "triton")
    got = model(images)
    (got * g).sum().backward()

    def close(a, b, tol):   # relative to the reference's norm; exactly equal where that is zero (the last layer's
        return (a.double() - b).norm() <= tol * b.norm()   # forward-direction A_log with a head class token)
    assert close(got, want, 1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert close(p.grad, q.grad, 1e-4), name
    assert len(matching_margins) == 4 and min(matching_margins) > 1e-5   # both runs' two fused layers: no near-ties


@pytest.mark.parametrize("cls_position,strategy,layer,token,order,mode", [
    ("middle", "all", 0, 2, "released", "mean"),
    ("middle", "upper", 0, 3, "spatial", "size"),
    ("head", "interleaved", 0, 4, "released", "size"),
    ("middle", "lower", 3, 3, "spatial", "mean"),
])
def test_model_with_fusion_matches_naive_float64(cls_position, strategy, layer, token, order, mode):
    kw = dict(cls_position=cls_position, fusion_strategy=strategy, fusion_layer=layer, fusion_token=token,
              fusion_order=order, fusion_mode=mode)
    model = tiny(seed=1, **kw).double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=F64)
    requested = token_fusion.fusion_schedule(strategy, layer, token, 4)
    removed, _ = token_fusion.cap_schedule(requested, 17)
    # the final norm's input rows, to check where the readout comes from
    seen = {}
    model.norm_f.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    model.head.register_forward_hook(lambda mod, inp, out: seen.update(feat=inp[0]))
    got = model(images)
    want, cls = naive_model(model, images, cls_position, (removed, order, mode))
    assert seen["out"].shape[1] == 17 - sum(removed)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()
    # readout = the class token's row wherever fusion moved it (tracked by the naive loop)
    for b in range(3):
        assert torch.equal(seen["feat"][b], seen["out"][b, cls[b]])
    if cls_position == "middle" and order == "released":
        assert any(c != 8 for c in cls)  # fusion did move it


def test_readout_of_middle_class_token_moved_by_fusion():
    """cls_position='middle', released order: after one fusion layer the class token (index 8 of 17) sits at
    the number of unfused A tokens before it; the head must read exactly that row. Marked by making the class
    token huge, so its row is recognisable in the final norm's input."""
    model = tiny(cls_position="middle", fusion_strategy="lower", fusion_layer=1, fusion_token=4).eval()
    with torch.no_grad():
        model.cls_token.fill_(1e3)
    rows = {}
    model.layers[1].register_forward_pre_hook(lambda mod, args: rows.update(residual=args[1], cls=args[2]))
    model.head.register_forward_hook(lambda mod, inp, out: rows.update(feat=inp[0]))
    model.norm_f.register_forward_hook(lambda mod, inp, out: rows.update(out=out))
    model(torch.randn(4, 3, 32, 32))
    res = rows["residual"]
    assert res.shape[1] == 13
    for b in range(4):
        big = int(res[b].norm(dim=-1).argmax())  # where the class token really is after layer 0's fusion
        assert big == int(torch.as_tensor(rows["cls"]).expand(4)[b])
        assert big != 8
        assert torch.equal(rows["feat"][b], rows["out"][b, big])


# ----------------------------------------------------------------------------- no fusion = plain Vim

@pytest.mark.parametrize("fusion_kw", [
    dict(fusion_strategy="no"),
    dict(fusion_strategy="no", fusion_token=5, fusion_layer=2, fusion_order="spatial", fusion_mode="size"),
    dict(fusion_strategy="none", fusion_token=3),
    dict(fusion_strategy="all", fusion_token=0),
])
@pytest.mark.parametrize("cls_position", ["head", "middle"])
def test_no_fusion_is_bit_identical(fusion_kw, cls_position):
    base = tiny(seed=3, cls_position=cls_position).eval()
    other = tiny(seed=4, cls_position=cls_position, **fusion_kw).eval()
    other.load_state_dict(base.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(base(images), other(images))
    # and fusion actually changes the result when it is on
    fused = tiny(seed=4, cls_position=cls_position, fusion_strategy="all", fusion_token=2).eval()
    fused.load_state_dict(base.state_dict(), strict=True)
    assert not torch.allclose(base(images), fused(images), atol=1e-6)


# ----------------------------------------------------------------------------- gradients

def test_gradients_reach_every_parameter_with_fusion_middle_class():
    model = tiny(cls_position="middle", fusion_strategy="all", fusion_token=2, fusion_order="released")
    torch.manual_seed(5)
    out = model(torch.randn(2, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).all(), f"{name}: {(p.grad == 0).sum().item()} exactly-zero gradient entries"


def test_autocast_keeps_the_residual_stream_float32_and_fuses_the_hidden_stream_in_bfloat16():
    """As Vim (residual_in_fp32): under autocast the first mixer reads the float32 embedded tokens, later ones the
    normalised stream in the mixer output's dtype; the residual stream stays float32 through the fusion."""
    model = tiny(fusion_strategy="all", fusion_token=2)
    seen = []
    for layer in model.layers:
        layer.mixer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        layer.register_forward_hook(lambda m, args, out: seen.append(out[1].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    mixer_in, residual = seen[0::2], seen[1::2]
    assert mixer_in == [torch.float32] + [torch.bfloat16] * (len(model.layers) - 1)
    assert residual == [torch.float32] * len(model.layers)
    assert torch.isfinite(out).all()


def test_head_class_token_last_forward_A_log_gradient_is_exactly_zero():
    """With the class token at position 0, the readout of the last layer's mixer is its output at t = 0; the
    forward scan there is h_0 = delta_0 B_0 u_0 (h_{-1} = 0), independent of A. So the last layer's A_log gets an
    exactly-zero gradient, while its backward twin A_b_log (t = 0 is the backward scan's last step) does not."""
    model = tiny(cls_position="head", fusion_strategy="upper", fusion_layer=0, fusion_token=2)
    torch.manual_seed(6)
    out = model(torch.randn(2, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    last = model.layers[-1].mixer
    assert torch.equal(last.A_log.grad, torch.zeros_like(last.A_log))
    assert (last.A_b_log.grad != 0).all()
    for layer in model.layers[:-1]:
        assert (layer.mixer.A_log.grad != 0).all()
    # the forward conv's first three taps only ever see the zero padding at t = 0 in the last layer
    assert torch.equal(last.conv1d.weight.grad[..., :3], torch.zeros_like(last.conv1d.weight.grad[..., :3]))
    assert (last.conv1d.weight.grad[..., 3] != 0).all()


# ----------------------------------------------------------------------------- Vim layout and init

def expected_vim_ti_shapes(num_classes=1000, depth=24):
    """Spec section 6, written out: D = 192, E = 384, N = 16, R = 12, 196 patches + class token."""
    shapes = {"cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
              "patch_embed.proj.bias": (192,), "head.weight": (num_classes, 192), "head.bias": (num_classes,),
              "norm_f.weight": (192,)}
    for i in range(depth):
        shapes[f"layers.{i}.norm.weight"] = (192,)
        mixer = f"layers.{i}.mixer."
        shapes[mixer + "in_proj.weight"] = (768, 192)
        shapes[mixer + "out_proj.weight"] = (192, 384)
        for sfx in ("", "_b"):
            shapes[mixer + f"conv1d{sfx}.weight"] = (384, 1, 4)
            shapes[mixer + f"conv1d{sfx}.bias"] = (384,)
            shapes[mixer + f"x_proj{sfx}.weight"] = (44, 384)
            shapes[mixer + f"dt_proj{sfx}.weight"] = (384, 12)
            shapes[mixer + f"dt_proj{sfx}.bias"] = (384,)
        shapes[mixer + "A_log"] = (384, 16)
        shapes[mixer + "A_b_log"] = (384, 16)
        shapes[mixer + "D"] = (384,)
        shapes[mixer + "D_b"] = (384,)
    return shapes


def test_state_dict_matches_vim_ti(vim_ti):
    got = {k: tuple(v.shape) for k, v in vim_ti.state_dict().items()}
    assert got == expected_vim_ti_shapes()
    assert len(got) == 7 + 24 * 17


def test_state_dict_unchanged_by_fusion_settings(vim_ti):
    torch.manual_seed(0)
    fused = timm.create_model(TI, num_classes=1000, cls_position="head", fusion_strategy="upper",
                              fusion_layer=4, fusion_token=8, fusion_order="spatial", fusion_mode="size")
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == expected_vim_ti_shapes()


def test_parameter_counts(vim_ti):
    assert sum(p.numel() for p in vim_ti.parameters()) == 7_148_008
    torch.manual_seed(0)
    small = timm.create_model(SMALL, num_classes=1000)
    assert sum(p.numel() for p in small.parameters()) == 25_796_584


def test_initialisation(vim_ti):
    n, depth, rank = 16, 24, 12
    log_range = torch.tensor([math.log(k) for k in range(1, n + 1)], dtype=F64)
    lo, hi = 1e-3, 1e-1
    for i, layer in enumerate(vim_ti.layers):
        m = layer.mixer
        for a in (m.A_log, m.A_b_log):
            assert a.shape == (384, n)
            assert torch.allclose(a.double(), log_range.expand(384, n), rtol=0, atol=1e-6), i
        assert torch.equal(m.D, torch.ones(384)) and torch.equal(m.D_b, torch.ones(384))
        dt = F.softplus(m.dt_proj.bias.double())
        assert dt.min() >= 1e-4 and dt.max() <= hi * (1 + 1e-5), i
        assert dt.min() >= lo * (1 - 1e-5), i  # dt drawn in [1e-3, 1e-1], so the 1e-4 floor never binds
        assert torch.equal(m.dt_proj_b.bias, torch.zeros(384)), i
        assert m.dt_proj.weight.abs().max() <= rank ** -0.5
        assert m.dt_proj_b.weight.abs().max() <= rank ** -0.5  # PyTorch default Linear: 1/sqrt(fan_in)
        bound = 1 / math.sqrt(384) / math.sqrt(depth)          # kaiming_uniform(a=sqrt 5) / sqrt(depth)
        w = m.out_proj.weight
        assert w.abs().max() <= bound * (1 + 1e-6)
        assert w.abs().max() >= 0.99 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.03, i
        assert w.mean().abs() < 0.05 * bound
    # log-uniform dt across all forward layers: log10(dt) spread evenly over [-3, -1]
    logs = torch.cat([F.softplus(l.mixer.dt_proj.bias.double()).log10() for l in vim_ti.layers])
    assert abs(logs.mean().item() + 2) < 0.02 and logs.min() < -2.99 and logs.max() > -1.01
    assert torch.equal(vim_ti.head.bias, torch.zeros(1000))
    assert abs(vim_ti.head.weight.std().item() - 0.02) < 0.001
    assert abs(vim_ti.pos_embed.std().item() - 0.02) < 0.001
    assert torch.equal(vim_ti.patch_embed.proj.bias, torch.zeros(192))
    # lecun normal: std = 1/sqrt(fan_in), fan_in = 3 * 16 * 16 (truncated normal, so within a few percent)
    assert abs(vim_ti.patch_embed.proj.weight.std().item() * math.sqrt(768) - 1) < 0.05
    for name, mod in vim_ti.named_modules():  # every nn.Linear bias is zero except dt_proj's
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None and not name.endswith("mixer.dt_proj"):
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
    assert torch.equal(vim_ti.norm_f.weight, torch.ones(192))


def test_no_weight_decay(vim_ti):
    skip = vim_ti.no_weight_decay()
    expected = {"pos_embed", "cls_token"} | {f"layers.{i}.mixer.{n}" for i in range(24)
                                             for n in ("A_log", "A_b_log", "D", "D_b")}
    assert expected <= set(skip)
    params = dict(vim_ti.named_parameters())
    assert set(skip) <= set(params)
    # weight matrices (in_proj, x_proj, dt_proj, out_proj, conv, patch, head) stay decayed
    for name in skip:
        if params[name].ndim >= 2:
            assert name in expected, name


# ----------------------------------------------------------------------------- schedules on the model

@pytest.mark.parametrize("strategy,layer,token,removed,fraction,fused_layers", [
    ("all", 0, 7, 168, 0.556, list(range(24))),
    ("interleaved", 0, 14, 168, 0.574, list(range(1, 24, 2))),
    ("alternate", 3, 14, 168, 0.574, list(range(1, 24, 2))),
    ("lower", 19, 9, 171, 0.457, list(range(19))),
    ("upper", 4, 9, 171, 0.638, list(range(5, 24))),
    ("upper", 4, 8, 152, 0.679, list(range(5, 24))),
    ("none", 4, 8, 0, 1.0, []),
])
def test_fusion_summary_vim_ti(strategy, layer, token, removed, fraction, fused_layers):
    model = timm.create_model(TI, num_classes=100, fusion_strategy=strategy, fusion_layer=layer,
                              fusion_token=token)
    s = model.fusion_summary()
    assert s["tokens_in"] == 197
    assert s["tokens_removed_total"] == removed
    assert s["fused_layers"] == fused_layers
    assert round(s["token_layer_fraction"], 3) == fraction
    assert s["strategy"] == {"none": "no", "alternate": "interleaved"}.get(strategy, strategy)
    assert s["removed_per_layer"] == [token if i in fused_layers else 0 for i in range(24)]
    # tokens entering each layer's mixer, counted by hand: 197 minus what this and earlier layers removed
    want, t = [], 197
    for i in range(24):
        t -= token if i in fused_layers else 0
        want.append(t)
    assert s["tokens_per_layer"] == want


@pytest.mark.parametrize("cls_position", ["head", "middle"])
@pytest.mark.parametrize("order", ["released", "spatial"])
def test_source_maps_hold_the_groups_the_model_averaged(cls_position, order):
    """With every mixer's out_proj zeroed the residual stream is only ever fused, so in size mode the final norm's
    input row j is the plain mean of the embedded tokens that the last source map assigns to j; the class token
    holds only itself and is the row read out. Tracking leaves the logits bit for bit as they were."""
    model = tiny(seed=2, cls_position=cls_position, fusion_strategy="interleaved", fusion_token=3,
                 fusion_order=order, fusion_mode="size").double().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.zero_()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(embedded=args[0]))
    model.norm_f.register_forward_hook(lambda mod, inp, out: seen.update(final=inp[0], out=out))
    model.head.register_forward_hook(lambda mod, inp, out: seen.update(feat=inp[0]))
    images = torch.randn(3, 3, 32, 32, dtype=F64)
    assert torch.equal(model(images, []), model(images))
    sources = []
    model(images, sources)
    assert len(sources) == 4 and all(s.shape == (3, 17) for s in sources)
    assert torch.equal(sources[0], torch.arange(17).expand(3, -1)) and torch.equal(sources[2], sources[1])
    final, cls_init = sources[-1], model.cls_index_init
    assert [int(s.max()) + 1 for s in sources] == model.tokens_per_layer == [17, 14, 14, 11]
    for b in range(3):
        groups = [[t for t in range(17) if final[b, t] == j] for j in range(11)]
        assert sorted(t for g in groups for t in g) == list(range(17))
        want = torch.stack([seen["embedded"][b, g].mean(0) for g in groups])
        assert torch.allclose(seen["final"][b], want, rtol=0, atol=1e-12)
        cls_out = int(final[b, cls_init])
        assert groups[cls_out] == [cls_init]
        assert torch.equal(seen["feat"][b], seen["out"][b, cls_out])


def test_capped_schedule_in_model_forward():
    """17 tokens, fusion_token 100 in all 4 layers: capped at (t - 1) // 2 -> removes 8, 4, 2, 1 and the mixers
    see 9, 5, 3, 2 tokens."""
    model = tiny(fusion_strategy="all", fusion_token=100).eval()
    assert model.fusion_summary()["removed_per_layer"] == [8, 4, 2, 1]
    lengths = []
    for layer in model.layers:
        layer.mixer.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    out = model(torch.randn(2, 3, 32, 32))
    assert lengths == [9, 5, 3, 2] and out.shape == (2, 5)


def test_invalid_settings_raise_with_allowed_values():
    cases = [
        (dict(fusion_strategy="sometimes"), ["no", "none", "all", "interleaved", "alternate", "lower", "upper"]),
        (dict(fusion_strategy="all", fusion_token=-1), ["non-negative"]),
        (dict(fusion_strategy="lower", fusion_layer=0, fusion_token=2), ["1..3"]),
        (dict(fusion_strategy="lower", fusion_layer=4, fusion_token=2), ["1..3"]),
        (dict(fusion_strategy="upper", fusion_layer=3, fusion_token=2), ["0..2"]),
        (dict(fusion_strategy="upper", fusion_layer=-1, fusion_token=2), ["0..2"]),
        (dict(fusion_order="random"), ["released", "spatial"]),
        (dict(fusion_mode="max"), ["mean", "size"]),
        (dict(cls_position="tail"), ["head", "middle"]),
        (dict(ssm_backend="mamba"), ["auto", "triton", "cuda", "torch"]),
    ]
    for kw, names in cases:
        with pytest.raises(ValueError) as err:
            tiny(**kw)
        for name in names:
            assert name in str(err.value), (kw, str(err.value))
    # all / interleaved accept and ignore any fusion_layer
    for layer in (-3, 0, 3, 99):
        assert tiny(fusion_strategy="all", fusion_layer=layer, fusion_token=1).removed_per_layer == [1] * 4
        assert tiny(fusion_strategy="interleaved", fusion_layer=layer, fusion_token=1).removed_per_layer == [0, 1] * 2


# ----------------------------------------------------------------------------- checkpoints

def test_state_dict_loads_strict_across_fusion_settings():
    src = tiny(seed=7, cls_position="head")
    buf = io.BytesIO()
    torch.save({"model": src.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)["model"]
    dst = tiny(seed=8, cls_position="middle", fusion_strategy="upper", fusion_layer=1, fusion_token=3,
               fusion_order="spatial", fusion_mode="size")
    result = dst.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # the loaded model computes with the loaded weights: float64 naive model on them agrees
    dst = dst.double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=F64)
    want, _ = naive_model(dst, images, "middle", ([0, 0, 3, 3], "spatial", "size"))
    assert torch.allclose(dst(images), want, rtol=1e-5, atol=1e-7)
