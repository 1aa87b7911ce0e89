"""CUDA-only checks, run on the GPU machine (scripts/gpu_check.sh); they skip on machines without CUDA or
without kernels (causal-conv1d with Triton or mamba-ssm).

Each kernel path and the pure-PyTorch path of the whole Vim-Ti model agree (fp32 logits and every parameter
gradient), for every strategy, and give the same gradients twice; the captured training step (fp32, bf16, fp16 with loss scaling; one process
and over NCCL) trains like the eager step, follows the learning rate the scheduler writes, skips a step whose
fp16 gradients overflow, and is captured while a loader thread pins memory."""
import math
import threading

import pytest
import torch

import ssm_ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ssm_ops.KERNELS_AVAILABLE),
                                reason="needs a CUDA device and kernels (causal-conv1d with Triton or mamba-ssm)")
KERNEL_BACKENDS = [name for name, (available, _) in ssm_ops.KERNEL_BACKENDS.items() if available]

import timm  # noqa: E402

from timm.optim import create_optimizer_v2  # noqa: E402

import models_mamba  # noqa: E402
from engine import build_train_step  # noqa: E402

VIM_TI = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
STRATEGIES = {
    "none": dict(fusion_strategy="no"),
    "all-r7": dict(fusion_strategy="all", fusion_token=7),
    "interleaved-r14": dict(fusion_strategy="interleaved", fusion_token=14),
    "lower-L19-r9": dict(fusion_strategy="lower", fusion_layer=19, fusion_token=9),
    "upper-L4-r9": dict(fusion_strategy="upper", fusion_layer=4, fusion_token=9),
    "upper-L4-r8-middle-spatial": dict(fusion_strategy="upper", fusion_layer=4, fusion_token=8,
                                       cls_position="middle", fusion_order="spatial"),
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _pair(backend, **kwargs):
    torch.manual_seed(0)
    fast = timm.create_model(VIM_TI, num_classes=100, drop_path_rate=0.0, ssm_backend=backend, **kwargs).cuda()
    ref = timm.create_model(VIM_TI, num_classes=100, drop_path_rate=0.0, ssm_backend="torch", **kwargs).cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _logits_and_grads(model, x, w, amp_dtype=None):
    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x)
    (out.float() * w).sum().backward()
    return out.float().detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_kernel_path_matches_torch_path_fp32(name, backend, monkeypatch):
    fast, ref = _pair(backend, **STRATEGIES[name])
    x = torch.randn(4, 3, 224, 224, device="cuda")
    w = torch.randn(4, 100, device="cuda")
    out_fast, grads_fast = _logits_and_grads(fast, x, w)
    monkeypatch.setattr(models_mamba, "_use_norm_kernels", lambda x: False)   # the reference's add + RMSNorm too
    out_ref, grads_ref = _logits_and_grads(ref, x, w)
    assert rel(out_fast, out_ref) < 1e-3
    worst = max(((rel(grads_fast[n], g), n) for n, g in grads_ref.items() if g.norm() > 0))
    print(f"{backend} {name}: logits rel err {rel(out_fast, out_ref):.2e}, worst grad rel err {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-3, worst
    zero_ref = [n for n, g in grads_ref.items() if g.norm() == 0]
    assert all(grads_fast[n].norm() < 1e-6 for n in zero_ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_path_bf16_autocast_close_to_fp32_reference(backend, monkeypatch):
    # Without fusion only: bf16 rounding can flip which tokens a fused layer matches.
    fast, ref = _pair(backend)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    w = torch.randn(4, 100, device="cuda")
    out_fast, grads_fast = _logits_and_grads(fast, x, w, torch.bfloat16)
    monkeypatch.setattr(models_mamba, "_use_norm_kernels", lambda x: False)
    out_ref, _ = _logits_and_grads(ref, x, w)
    print(f"{backend} bf16: logits rel err {rel(out_fast, out_ref):.2e}")
    assert rel(out_fast, out_ref) < 5e-2
    assert all(torch.isfinite(g).all() for g in grads_fast.values())


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_kernels_give_the_same_gradients_twice(amp_dtype):
    """The default CUDA path is deterministic: the same fused batch twice gives bitwise-equal logits and
    parameter gradients (the kernels' reductions are partial sums added in a fixed order, no atomics)."""
    torch.manual_seed(0)
    model = timm.create_model(VIM_TI, num_classes=100, drop_path_rate=0.0, **STRATEGIES["upper-L4-r9"]).cuda()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    w = torch.randn(16, 100, device="cuda")
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        runs.append(_logits_and_grads(model, x, w, amp_dtype))
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    assert [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])] == []


def _train(cuda_graph, steps, lr_at, amp_dtype=None, process_group=None, ddp=False, overflow_at=None, fused=None,
           opt_name="adamw", nan_at=None):
    """Parameters after each step of a small fused Vim; fp16 gets a loss scaler, whose scale is set so high
    before step ``overflow_at`` that the gradients overflow (that step must be skipped, and the scale goes back
    to the initial 2^16). ``fused``: the AdamW kernel (default: main.py's, fused for the captured step); ``opt_name``
    "sgd": SGD with momentum, whose update the captured step runs eagerly after the replay. ``nan_at``: that step's
    images are NaN, and the step skips non-finite updates (--if_continue_inf)."""
    torch.manual_seed(0)
    model = timm.create_model(VIM_TI, num_classes=10, drop_path_rate=0.0, depth=6,
                              fusion_strategy="upper", fusion_layer=1, fusion_token=9).cuda()
    fp16 = amp_dtype == torch.float16
    if opt_name == "adamw":
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, capturable=cuda_graph,
                                  fused=cuda_graph if fused is None else fused)
    else:
        opt = create_optimizer_v2(model, opt=opt_name, lr=1e-3, weight_decay=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", backoff_factor=2.0 ** -24) if fp16 else None
    step = build_train_step(torch.nn.parallel.DistributedDataParallel(model) if ddp else model,
                            torch.nn.CrossEntropyLoss(), opt, amp_dtype=amp_dtype, loss_scaler=scaler,
                            clip_grad=1.0, cuda_graph=cuda_graph, process_group=process_group,
                            skip_nonfinite=nan_at is not None)
    g = torch.Generator(device="cuda").manual_seed(1)
    losses, snapshots, scales = [], [], []
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        if i == overflow_at:
            scaler._scale.fill_(2.0 ** 40)  # in place: the captured graphs read this tensor
        x = torch.randn(8, 3, 224, 224, device="cuda", generator=g)
        y = torch.randint(0, 10, (8,), device="cuda", generator=g)
        if i == nan_at:
            x = torch.full_like(x, float("nan"))
        losses.append(step(x, y).item())
        snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        scales.append(scaler.get_scale() if fp16 else None)
    return losses, snapshots, scales


def _lr(i):
    return 0.0 if i in (6, 7) else 1e-3 * (i + 1)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_captured_step_trains_like_eager_and_follows_lr(amp_dtype):
    overflow = 8 if amp_dtype == torch.float16 else None  # after warm-up and capture: a replay must skip it
    # the same AdamW kernel on both sides: what differs is the capture alone
    eager_losses, eager_params, eager_scales = _train(False, 10, _lr, amp_dtype, overflow_at=overflow, fused=True)
    graph_losses, graph_params, graph_scales = _train(True, 10, _lr, amp_dtype, overflow_at=overflow)
    assert len(set(graph_losses)) > 4  # replays compute fresh losses
    for a, b in zip(eager_losses, graph_losses):
        assert abs(a - b) < (1e-3 if amp_dtype is None else 2e-2) * max(1.0, abs(a))
    assert rel(graph_params[5], eager_params[5]) < 1e-3
    assert rel(graph_params[9], eager_params[9]) < 1e-3
    # lr 0 written by the "scheduler": no update (and no NaN where a gradient has always been zero, as the last
    # layer's forward-direction A_log with a head class token)
    assert torch.equal(graph_params[7], graph_params[5])
    assert not torch.equal(graph_params[5], graph_params[4])
    if amp_dtype == torch.float16:
        assert graph_scales == eager_scales and graph_scales[8] == 2.0 ** 16  # backed off once, from 2^40
        assert torch.equal(graph_params[8], graph_params[7])  # the overflowing step is skipped
        assert not torch.equal(graph_params[9], graph_params[8])


@pytest.mark.parametrize("amp_dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_captured_forward_backward_with_an_eager_sgd_update_trains_like_eager(amp_dtype):
    """An optimizer without device learning rates: forward and backward replayed, the update (clipping, SGD,
    fp16 loss scaling's skip-and-update) run eagerly after it, as the eager step runs them."""
    overflow = 8 if amp_dtype == torch.float16 else None
    eager_losses, eager_params, eager_scales = _train(False, 10, _lr, amp_dtype, overflow_at=overflow, opt_name="sgd")
    graph_losses, graph_params, graph_scales = _train(True, 10, _lr, amp_dtype, overflow_at=overflow, opt_name="sgd")
    assert len(set(graph_losses)) > 4
    for a, b in zip(eager_losses, graph_losses):
        assert abs(a - b) < (1e-3 if amp_dtype is None else 2e-2) * max(1.0, abs(a))
    assert rel(graph_params[5], eager_params[5]) < 1e-3 and rel(graph_params[9], eager_params[9]) < 1e-3
    assert torch.equal(graph_params[7], graph_params[5])  # lr 0 from the "scheduler" moves nothing
    assert not torch.equal(graph_params[5], graph_params[4])
    if amp_dtype == torch.float16:
        assert graph_scales == eager_scales and graph_scales[8] == 2.0 ** 16
        assert torch.equal(graph_params[8], graph_params[7])


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["captured", "eager"])
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_if_continue_inf_skips_a_nonfinite_step_on_the_device(cuda_graph, amp_dtype):
    """No loss scaler: the fused AdamW's found_inf flag skips a step of NaN images (after warm-up and capture, so a
    replay), and the next step trains again."""
    losses, params, _ = _train(cuda_graph, 10, lambda i: 1e-3, amp_dtype, fused=True, nan_at=8)
    assert math.isnan(losses[8]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 8)
    assert torch.equal(params[8], params[7]) and torch.isfinite(params[9]).all()
    assert not torch.equal(params[9], params[8])


def test_captured_step_over_nccl_equals_eager_ddp():
    """World size 1 over NCCL: the captured step's all-reduce of its flat gradient buffer between the two
    replays against torch's DDP with main.py's eager AdamW (foreach: it rounds differently from the fused one)."""
    import torch.distributed as dist
    from pipeline_helpers import free_port
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        _, ddp_params, _ = _train(False, 8, _lr, ddp=True)
        _, graph_params, _ = _train(True, 8, _lr, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert rel(graph_params[5], ddp_params[5]) < 1e-3 and rel(graph_params[7], ddp_params[7]) < 1e-3
    assert torch.equal(graph_params[7], graph_params[5])


def test_cuda_graph_capture_survives_a_pin_memory_thread():
    """main.py's loader pins batches in a thread while the step is captured: its host allocations must not
    abort the capture (they would in global capture mode)."""
    done = threading.Event()

    def pin_memory_thread():
        size = 1 << 16
        while not done.is_set():  # new sizes: fresh cudaHostAlloc calls, as a loader's first batches make
            torch.empty(size, pin_memory=True)
            size += 4096

    thread = threading.Thread(target=pin_memory_thread, daemon=True)
    thread.start()
    try:
        losses, _, _ = _train(True, 6, lambda i: 1e-3)
    finally:
        done.set()
        thread.join()
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", ["upper-L4-r9", "upper-L4-r8-middle-spatial"])
def test_source_maps_with_cuda_fusion_kernels_equal_the_torch_fusion(source_maps_both_ways, name):
    """Vim-Ti's per-layer source maps with the fusion on kernels/fusion.py (fusion_map and the Triton merge, order
    "released"; the Triton merge with the torch matching, "spatial") equal those of the torch fusion on CUDA."""
    torch.manual_seed(0)
    model = timm.create_model(VIM_TI, num_classes=100, drop_path_rate=0.0, **STRATEGIES[name]).cuda().eval()
    maps = source_maps_both_ways(model, torch.randn(4, 3, 224, 224, device="cuda"))
    for layer, (a, b) in enumerate(zip(*maps)):
        assert torch.equal(a, b), layer
    assert int(maps[0][-1].max()) + 1 == model.tokens_per_layer[-1]
