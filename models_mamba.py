"""Vision Mamba (Vim) with Famba-V cross-layer token fusion, registered with timm.

    import models_mamba, timm
    model = timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                              num_classes=100, fusion_strategy="upper", fusion_layer=4, fusion_token=8)

Parameter names and shapes are Vim's, so an official Vim checkpoint's "model" dict loads with strict=True; it
computes Vim's function only with cls_position="middle" (the class token where Vim's checkpoints have it), while
the default, "head", is Famba-V's.
Layer i (of 24, run one after another) with residual stream r and hidden h:
    r = h_embedded (i = 0) or r + drop_path(h);  h = RMSNorm(r);  [fuse tokens of h and r];  h = mixer(h)
then logits = head(RMSNorm(r + drop_path(h))[class token]). The mixer is bimamba v2 (ssm_ops.py).
model(x, sources) with a list also appends the fusion's source map after every layer to it (which input tokens
each token holds, token_fusion.compose_source); scripts/visualize_fusion.py draws them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import register_model

import ssm_ops
import token_fusion

try:  # the fused residual add + RMSNorm on CUDA; the torch path needs nothing else
    from kernels import norm as norm_kernels
except ImportError:
    norm_kernels = None

CLS_POSITIONS = ("head", "middle")


def _at_least_fp32(t):
    """The scan's A, D and delta bias stay in float32 (float64 for float64 models) whatever the weights are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, M, D) patch tokens by a strided convolution."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        side = (img_size - patch_size) // stride + 1
        if side < 1:
            raise ValueError(f"img_size={img_size} is smaller than patch_size={patch_size}")
        self.img_size, self.grid_size, self.num_patches = img_size, (side, side), side * side
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        p, s = self.proj.kernel_size[0], self.proj.stride[0]
        if p != s or self.img_size % p:  # overlapping patches (or a cropped border): the convolution itself
            return self.proj(x).flatten(2).transpose(1, 2)
        # Non-overlapping patches: the convolution is one GEMM on the patches laid out as rows, which is
        # cheaper than cuDNN's convolution (and, in bf16, its layout conversions).
        b, c, side = x.shape[0], x.shape[1], self.grid_size[0]
        patches = x.reshape(b, c, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(b * side * side, c * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias).view(b, side * side, -1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _AddNorm(torch.autograd.Function):
    """add_norm on kernels/norm.py: one kernel forward, one backward (plus the weight gradient's sum)."""

    @staticmethod
    def forward(ctx, hidden, residual, weight, scale, eps, out_dtype):
        normed, residual_out, rstd = norm_kernels.add_norm_fwd(hidden, residual, weight, scale, eps, out_dtype)
        ctx.save_for_backward(residual_out, rstd, weight, scale)
        ctx.set_materialize_grads(False)   # the final norm's residual' has no gradient: no zeros for it
        ctx.has_residual, ctx.hidden_dtype = residual is not None, hidden.dtype
        return normed, residual_out

    @staticmethod
    def backward(ctx, dnormed, dresidual):
        residual_out, rstd, weight, scale = ctx.saved_tensors
        dhidden, dresidual, dweight = norm_kernels.add_norm_bwd(dnormed, dresidual, residual_out, rstd, weight, scale,
                                                                ctx.has_residual, ctx.hidden_dtype)
        return dhidden, dresidual, dweight, None, None, None


def _drop_scale(drop_path, x):
    """timm's DropPath on x (B, ...) as the per-sample factor it multiplies by ((B,) float32), None where it is the
    identity (no drop path, eval mode)."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0:
        return None
    keep = 1 - drop_path.drop_prob
    scale = torch.empty(x.shape[0], device=x.device, dtype=torch.float32).bernoulli_(keep)
    return scale.div_(keep) if drop_path.scale_by_keep and keep > 0 else scale


def _use_norm_kernels(x):
    """Whether add_norm runs on kernels/norm.py (float32/16 streams on CUDA with Triton installed)."""
    return norm_kernels is not None and x.is_cuda and x.dtype != torch.float64


def add_norm(norm, drop_path, hidden, residual, out_dtype):
    """residual' = residual + drop_path(hidden) (hidden itself when residual is None) and RMSNorm(residual') in
    ``out_dtype`` -> (normed, residual'). One kernel each way on CUDA (kernels/norm.py), torch ops elsewhere."""
    if _use_norm_kernels(hidden):
        return _AddNorm.apply(hidden, residual, norm.weight, _drop_scale(drop_path, hidden), norm.eps, out_dtype)
    residual = hidden if residual is None else residual + drop_path(hidden)
    return norm(residual).to(out_dtype), residual


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer (bimamba v2, divide-by-2): (B, L, D) -> (B, L, D).

    Each direction has its own conv1d / x_proj / dt_proj / A_log / D (the ``_b`` twins run on the sequence
    flipped along L); in_proj and out_proj are shared. The math is in ssm_ops.py.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4,
                 backend="auto"):
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, math.ceil(d_model / 16)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner,
                                                         padding=d_conv - 1))
            self.add_module("x_proj" + suffix, nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(self.dt_rank, d_inner, bias=True))
            self.register_parameter("A" + suffix + "_log", nn.Parameter(A_log.clone()))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(d_inner)))
        # Forward direction only (as in Vim): dt_proj drawn so that softplus(bias) is log-uniform in
        # [dt_min, dt_max]; the backward twin keeps PyTorch's Linear init and has its bias zeroed later.
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def kernels(self, tensor):
        """The kernels ('triton', 'cuda' or 'torch') this mixer runs with on tensors like ``tensor``."""
        return ssm_ops.resolve_backend(self.backend, tensor, 2 * self.d_inner, self.d_state)

    def forward(self, hidden, params=None):
        """hidden (B, L, D); params: this mixer's entry of stacked_params (computed here if not given)."""
        conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, in_proj_w, out_proj_w, gemm = (
            params or stacked_params([self], hidden)[0])
        return ssm_ops.bimamba_inner(hidden, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                                     out_proj_w, gemm, self.backend)


def _gemm_dtype(like, weight):
    """The dtype the mixer's GEMMs run in on tensors like ``like``: autocast's on CUDA, else the weights'."""
    if like.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return weight.dtype


def pad_dt_rank(x_proj_w, dt_proj_w, multiple=8):
    """x_proj_w (..., R+2N, E) and dt_proj_w (..., E, R) with the rank R padded by zero rows (after x_proj's first R)
    and zero columns to a multiple of ``multiple``: x_dbl = [dt (R) | zeros | B (N) | C (N)] and delta unchanged, the
    gradients of the real weights too. In 2-byte dtypes it makes every row of x_dbl and of dt_proj_w start 16-byte
    aligned whatever the token count (Vim-Ti: R = 12, x_dbl rows of 44 values), so that cuBLAS runs its Hopper
    kernels on them rather than, at some token counts of the fused layers, its slow unaligned wmma ones."""
    rank = dt_proj_w.shape[-1]
    pad = -rank % multiple
    if not pad:
        return x_proj_w, dt_proj_w
    zeros = x_proj_w.new_zeros(*x_proj_w.shape[:-2], pad, x_proj_w.shape[-1])
    return (torch.cat([x_proj_w[..., :rank, :], zeros, x_proj_w[..., rank:, :]], -2),
            F.pad(dt_proj_w, (0, pad)))


def stacked_params(mixers, like):
    """The two directions' parameters of every mixer, stacked as ssm_ops.bimamba_inner takes them (forward
    direction first): one tuple (conv_w (2E, W), conv_b, x_proj_w (2, R+2N, E), dt_proj_w (2, E, R), dt_bias,
    A = -exp(A_log) (2E, N), D, in_proj_w, out_proj_w, gemm) per mixer. Built for all mixers at once, a handful of
    ops per step instead of per layer; A, D and the delta bias in at least float32. For the Triton kernels (on
    tensors like ``like``) A is stored (N, 2E), as they read it, with 2-byte GEMMs the rank is padded
    (pad_dt_rank), in_proj_w is autocast's cast of in_proj's weight, and gemm holds the mixer's GEMM operands
    (ssm_ops.gemm_weights); otherwise in_proj_w is the weight itself and gemm None."""
    def both(get):
        return [t for m in mixers for t in (get(m, ""), get(m, "_b"))]
    n = len(mixers)
    triton = mixers[0].kernels(like) == "triton"
    A = -torch.exp(_at_least_fp32(torch.cat(both(lambda m, s: getattr(m, "A" + s + "_log"))))).unflatten(0, (n, -1))
    if triton:
        A = A.mT.contiguous().mT
    conv_w = torch.cat(both(lambda m, s: getattr(m, "conv1d" + s).weight))
    x_proj_w = torch.stack(both(lambda m, s: getattr(m, "x_proj" + s).weight)).unflatten(0, (n, 2))
    dt_proj_w = torch.stack(both(lambda m, s: getattr(m, "dt_proj" + s).weight)).unflatten(0, (n, 2))
    dtype = _gemm_dtype(like, x_proj_w)
    if triton and dtype.itemsize == 2:
        x_proj_w, dt_proj_w = pad_dt_rank(x_proj_w, dt_proj_w)
    in_proj_w, gemm = [m.in_proj.weight for m in mixers], [None] * n
    if triton:
        if in_proj_w[0].dtype != dtype:   # as autocast casts it in F.linear (same gradient), once for all layers
            in_proj_w = torch.stack(in_proj_w).to(dtype).unbind(0)
        with torch.no_grad():
            out_proj_w = torch.stack([m.out_proj.weight for m in mixers])
        gemm = list(zip(*(t.unbind(0) for t in ssm_ops.gemm_weights(x_proj_w, dt_proj_w, out_proj_w, dtype))))
    stacked = (
        conv_w.view(n, -1, conv_w.shape[-1]),
        torch.cat(both(lambda m, s: getattr(m, "conv1d" + s).bias)).view(n, -1),
        x_proj_w,
        dt_proj_w,
        _at_least_fp32(torch.cat(both(lambda m, s: getattr(m, "dt_proj" + s).bias))).view(n, -1),
        A,
        _at_least_fp32(torch.cat(both(lambda m, s: getattr(m, "D" + s)))).view(n, -1),
    )
    return [params + (i, m.out_proj.weight, g)
            for params, i, m, g in zip(zip(*(t.unbind(0) for t in stacked)), in_proj_w, mixers, gemm)]


class Block(nn.Module):
    """Add + RMSNorm, optional token fusion of both streams, mixer."""

    def __init__(self, dim, mixer, drop_path, fusion_r, fusion_order, fusion_mode):
        super().__init__()
        self.mixer, self.norm = mixer, RMSNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fusion_r, self.fusion_order, self.fusion_mode = fusion_r, fusion_order, fusion_mode

    def forward(self, hidden, residual, cls_index, size, source=None, mixer_params=None):
        # as Vim (residual_in_fp32): the residual stream stays float32, the normalised stream takes the mixer
        # output's dtype (bfloat16 / float16 under autocast), which is what the fusion then moves around
        hidden, residual = add_norm(self.norm, self.drop_path, hidden, residual, hidden.dtype)
        if self.fusion_r:
            hidden, residual, cls_index, size, source = token_fusion.fuse(
                hidden, residual, self.fusion_r, cls_index, size, self.fusion_order, self.fusion_mode, source)
        return self.mixer(hidden, mixer_params), residual, cls_index, size, source


class VisionMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, stride=None, depth=24, embed_dim=192, d_state=16, in_chans=3,
                 num_classes=1000, drop_rate=0., drop_path_rate=0.1, cls_position="head",
                 fusion_strategy="no", fusion_layer=0, fusion_token=0, fusion_order="released",
                 fusion_mode="mean", ssm_backend="auto"):
        super().__init__()
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if fusion_order not in token_fusion.ORDERS:
            raise ValueError(f"fusion_order must be one of {token_fusion.ORDERS}, got {fusion_order!r}")
        if fusion_mode not in token_fusion.MODES:
            raise ValueError(f"fusion_mode must be one of {token_fusion.MODES}, got {fusion_mode!r}")
        ssm_ops.check_backend(ssm_backend)
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, stride or patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_index_init = 0 if cls_position == "head" else num_patches // 2
        self.fusion = dict(strategy=fusion_strategy, layer=fusion_layer, token=fusion_token,
                           order=fusion_order, mode=fusion_mode)
        self.requested_per_layer = token_fusion.fusion_schedule(fusion_strategy, fusion_layer, fusion_token, depth)
        self.removed_per_layer, self.tokens_per_layer = token_fusion.cap_schedule(
            self.requested_per_layer, num_patches + 1)
        tokens_in = [num_patches + 1] + self.tokens_per_layer[:-1]
        if cls_position == "middle" and any(r and t == 3 for r, t in zip(self.removed_per_layer, tokens_in)):
            raise ValueError("these fusion settings fuse a 3-token sequence, where a middle class token can be "
                             "the only token of set B: fuse fewer tokens or use cls_position='head'")

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        # Vim: layer i drops the output of layer i-1 (on the CPU whatever the default device: a list of numbers)
        layer_drop = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList([
            Block(embed_dim, BiMamba(embed_dim, d_state, backend=ssm_backend), layer_drop[i],
                  self.removed_per_layer[i], fusion_order, fusion_mode)
            for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        for layer in self.layers:  # residual-branch output scaled by 1/sqrt(depth), as GPT-2 / Mamba
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(self.depth)

    def no_weight_decay(self):
        skip = {"pos_embed", "cls_token"}
        return skip | {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b")}

    def fusion_summary(self):
        """What the fusion settings do to this model (JSON-able)."""
        tokens = self.patch_embed.num_patches + 1
        return {
            **self.fusion,
            "strategy": token_fusion._ALIASES.get(self.fusion["strategy"], self.fusion["strategy"]),
            "tokens_in": tokens,
            "requested_per_layer": self.requested_per_layer,
            "removed_per_layer": self.removed_per_layer,
            "fused_layers": [i for i, r in enumerate(self.removed_per_layer) if r],
            "tokens_per_layer": self.tokens_per_layer,
            "tokens_removed_total": sum(self.removed_per_layer),
            "token_layer_fraction": sum(self.tokens_per_layer) / (tokens * self.depth),
        }

    def forward_features(self, x, sources=None):
        """(B, 3, H, W) -> (B, D) class-token features. With a list as ``sources``, the fusion's source map after
        each layer is appended to it: depth (B, M + 1) long tensors, [i][b, t] = the token (index in layer i's
        mixer input) holding token t of the embedded sequence (M patches in raster order, the class token at
        cls_index_init). Without it nothing is tracked and the computation is unchanged."""
        x = self.patch_embed(x)
        i = self.cls_index_init
        x = torch.cat([x[:, :i], self.cls_token.expand(x.shape[0], -1, -1), x[:, i:]], dim=1)
        hidden, residual, cls_index, size = self.pos_drop(x + self.pos_embed), None, i, None
        source = None if sources is None else token_fusion.identity_source(*x.shape[:2], x.device)
        for layer, params in zip(self.layers, stacked_params([layer.mixer for layer in self.layers], x)):
            hidden, residual, cls_index, size, source = layer(hidden, residual, cls_index, size, source, params)
            if sources is not None:
                sources.append(source)
        hidden, _ = add_norm(self.norm_f, self.drop_path, hidden, residual, residual.dtype)
        if isinstance(cls_index, int):
            return hidden[:, cls_index]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), cls_index]

    def forward(self, x, sources=None):
        return self.head(self.forward_features(x, sources))


def _create(pretrained, kwargs, **arch):
    if pretrained:
        raise ValueError("no pretrained Vim weights can be downloaded here: load a checkpoint with --finetune")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    return VisionMamba(**{**arch, **kwargs})


@register_model
def vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False, **kwargs):
    return _create(pretrained, kwargs, patch_size=16, embed_dim=192, depth=24)


@register_model
def vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False,
                                                                                             **kwargs):
    return _create(pretrained, kwargs, patch_size=16, stride=8, embed_dim=192, depth=24)


@register_model
def vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False, **kwargs):
    return _create(pretrained, kwargs, patch_size=16, embed_dim=384, depth=24)


@register_model
def vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False,
                                                                                              **kwargs):
    return _create(pretrained, kwargs, patch_size=16, stride=8, embed_dim=384, depth=24)


@register_model
def vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2(pretrained=False,
                                                                                            **kwargs):
    return _create(pretrained, kwargs, patch_size=16, embed_dim=768, depth=24)
