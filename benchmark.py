"""Training-step benchmark: what token fusion does to step time and peak memory, without data loading.

Each configuration (model x kernels x precision x batch size x mode x variant x strategy) times full
training steps (forward, loss, backward, AdamW step) on a fixed random batch with the same step object
main.py trains with (engine.build_train_step). Ratios are taken against the no-fusion run of the same
model, kernels, precision, batch size, mode and variant, measured in the same process, and printed next to
the ideal: the fraction of token-layers that remain (spec section 3).

    python benchmark.py --models vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \
        --strategies none all:7 interleaved:14 lower:19:9 upper:4:9 upper:4:8 --precisions fp32 bf16 \
        --modes eager graph --batch-sizes 128 --output bench.json

Strategies are written ``name[:layer]:token`` (``none``, ``all:7``, ``interleaved:14``, ``lower:19:9``).

Modes: ``graph`` (the captured step main.py trains with on CUDA), ``eager`` (``--no-cuda-graph``), ``ddp`` (the
captured step with its gradient all-reduce, as main.py runs it in several processes) and ``ddp-eager`` (eager
under DistributedDataParallel). The ddp modes join the process group that torchrun / torch.distributed.launch
sets up (one GPU per process; images/s then count every GPU), or else make one of world size 1 (NCCL).
"""
import argparse
import gc
import itertools
import json
import os
import socket
import statistics
import time

import timm
import torch
import torch.distributed as dist
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.autograd import DeviceType

import models_mamba  # noqa: F401  (registers the Vim models)
import ssm_ops
from engine import CAPTURED_UPDATE_OPTS, build_train_step

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("default", "tf32")  # tf32: TF32 matmuls and convolutions (opt-in in main.py), fp32 weights kept
MODES = ("graph", "eager", "ddp", "ddp-eager")


def parse_strategy(text):
    """'upper:4:9' -> {'fusion_strategy': 'upper', 'fusion_layer': 4, 'fusion_token': 9}."""
    name, *numbers = text.split(":")
    try:
        numbers = [int(n) for n in numbers]
    except ValueError:
        raise argparse.ArgumentTypeError(f"strategy {text!r}: expected name[:layer]:token with integers") from None
    if name in ("no", "none") and not numbers:
        return {"fusion_strategy": "no", "fusion_layer": 0, "fusion_token": 0}
    if name in ("lower", "upper") and len(numbers) == 2:
        return {"fusion_strategy": name, "fusion_layer": numbers[0], "fusion_token": numbers[1]}
    if name in ("all", "interleaved", "alternate") and len(numbers) == 1:
        return {"fusion_strategy": name, "fusion_layer": 0, "fusion_token": numbers[0]}
    raise argparse.ArgumentTypeError(f"strategy {text!r}: expected none, all:TOKEN, interleaved:TOKEN, "
                                     "lower:LAYER:TOKEN or upper:LAYER:TOKEN")


def strategy_label(fusion):
    s = fusion["fusion_strategy"]
    if s == "no":
        return "none"
    if s in ("lower", "upper"):
        return f"{s} L{fusion['fusion_layer']} r{fusion['fusion_token']}"
    return f"{s} r{fusion['fusion_token']}"


def get_args_parser():
    p = argparse.ArgumentParser("Famba-V training-step benchmark", add_help=False)
    p.add_argument("--models", nargs="+",
                   default=["vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"])
    p.add_argument("--strategies", nargs="+", type=parse_strategy,
                   default=[parse_strategy(s) for s in ("none", "all:7", "interleaved:14", "lower:19:9",
                                                         "upper:4:9", "upper:4:8")])
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="graph: the captured step (main.py's default on CUDA); eager: main.py --no-cuda-graph; "
                        "ddp / ddp-eager: the same with the gradient all-reduce of several processes "
                        "(default: graph on CUDA, eager on the CPU)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["default"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--depth", type=int, default=None, help="override the model's depth (tiny CPU runs)")
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--fusion-order", default="released", choices=["released", "spatial"])
    p.add_argument("--ssm-backends", nargs="+", default=["auto"], choices=ssm_ops.BACKENDS,
                   help="mixer kernels to compare (main.py --ssm-backend)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (a graph is captured after 3)")
    p.add_argument("--opt", default="adamw",
                   help="optimizer (timm's names, as main.py --opt); the captured step captures the update of "
                        f"{', '.join(CAPTURED_UPDATE_OPTS)} and runs any other's eagerly after the replay")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile 5 steps of each configuration (torch.profiler): GPU kernel time per step "
                        "and the top kernels, to see whether a step is bound by the GPU or by the host; "
                        "the JSON gets every kernel's time per step")
    p.add_argument("--output", default="", help="write the results as JSON here")
    return p


def measure(args, model_name, backend, fusion, precision, batch_size, mode, variant):
    """Median step time (ms) and peak allocated memory (MiB) of one configuration.

    Peak memory counts everything the configuration allocates (weights, optimizer state, batch, activations,
    and in graph mode the graph's private pool) from before the model is built.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # this process's GPU (set by join_process_group)
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if cuda:  # count only this configuration's memory, whatever earlier ones left allocated
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = variant == "tf32"
    torch.backends.cudnn.benchmark = True  # as main.py
    overrides = {k: v for k, v in (("depth", args.depth), ("embed_dim", args.embed_dim),
                                   ("patch_size", args.patch_size)) if v is not None}
    model = timm.create_model(model_name, num_classes=args.num_classes, img_size=args.input_size,
                              drop_path_rate=0.0, fusion_order=args.fusion_order, ssm_backend=backend,
                              **fusion, **overrides).to(device).train()
    graph = mode in ("graph", "ddp")
    amp_dtype = PRECISIONS[precision]
    opt_kwargs = {"fused": True, "capturable": graph} if cuda and args.opt.lower() in CAPTURED_UPDATE_OPTS else {}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=5e-4, weight_decay=0.1, **opt_kwargs)  # as main.py
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ddp_model = mode == "ddp-eager"
    if ddp_model:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    step = build_train_step(model, SoftTargetCrossEntropy(), optimizer, amp_dtype=amp_dtype, loss_scaler=scaler,
                            clip_grad=None, cuda_graph=graph,
                            process_group=dist.group.WORLD if mode == "ddp" else None)
    world = dist.get_world_size() if mode.startswith("ddp") else 1
    samples = torch.randn(batch_size, 3, args.input_size, args.input_size, device=device)
    targets = torch.randn(batch_size, args.num_classes, device=device).softmax(-1)  # mixup-style soft targets

    for _ in range(max(args.warmup, 4 if graph else 1)):
        step(samples, targets)
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(samples, targets)
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            loss = step(samples, targets)
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in times]
        peak = (torch.cuda.max_memory_allocated() - resident) / 2 ** 20
    else:
        peak = None  # no allocator statistics on the CPU
    gpu_ms, kernels_ms = profile(step, samples, targets) if args.profile and cuda else (None, None)
    if ddp_model:
        model = model.module
    kernels = model.layers[0].mixer.kernels(samples)
    result = {
        "model": model_name, "ssm_backend": kernels,
        "strategy": strategy_label(fusion), **fusion, "precision": precision,
        "batch_size": batch_size, "mode": mode, "variant": variant, "world_size": world, "optimizer": args.opt,
        "step_ms": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times),
        "images_per_s": world * batch_size / statistics.median(times) * 1e3, "peak_mib": peak,
        "ideal": model.fusion_summary()["token_layer_fraction"], "final_loss": float(loss), "gpu_kernel_ms": gpu_ms,
        "gpu_kernels": kernels_ms,
    }
    del model, optimizer, step, samples, targets, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def profile(step, samples, targets, steps=5):
    """GPU kernel time per step (ms) over ``steps`` steps, and {kernel: [ms, calls] per step} for every kernel,
    most expensive first; prints the 25 most expensive."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(samples, targets)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="device_time_total", row_limit=25, max_name_column_width=60))
    return kernel_times(averages, steps)


def kernel_times(averages, steps):
    """(GPU time per step in ms, {name: [ms, calls] per step}, most expensive first) of the device's own events
    (kernels, copies, memsets) among a profile's key_averages. The host ops that launched them carry the same time
    as their self device time (eager steps): counting those too would count every kernel twice."""
    kernels = sorted((e for e in averages if e.device_type != DeviceType.CPU and e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    return total, {e.key: [e.self_device_time_total / 1e3 / steps, e.count / steps] for e in kernels}


def add_ratios(results):
    """time/memory vs the no-fusion run with the same model, kernels, precision, batch size, mode and variant."""
    group = ("model", "ssm_backend", "precision", "batch_size", "mode", "variant", "world_size")
    base = {tuple(r[k] for k in group): r for r in results if r["fusion_strategy"] == "no"}
    for r in results:
        b = base.get(tuple(r[k] for k in group))
        r["time_vs_none"] = r["step_ms"] / b["step_ms"] if b else None
        r["mem_vs_none"] = r["peak_mib"] / b["peak_mib"] if b and r["peak_mib"] is not None else None
    return results


def short_name(model_name):
    return {"tiny": "Vim-Ti", "small": "Vim-S", "base": "Vim-B"}.get(model_name.split("_")[1], model_name)


def markdown_table(results):
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    lines = ["| model | kernels | precision | mode | variant | batch | strategy | step ms | img/s | peak MiB "
             "| time vs none | mem vs none | ideal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        mode = r['mode'] + (f" x{r['world_size']}" if r['mode'].startswith('ddp') else '')
        lines.append(f"| {short_name(r['model'])} | {r['ssm_backend']} | {r['precision']} | {mode} "
                     f"| {r['variant']} | {r['batch_size']} | {r['strategy']} | {r['step_ms']:.1f} "
                     f"| {r['images_per_s']:.0f} "
                     f"| {fmt(r['peak_mib'], '.0f')} | {fmt(r['time_vs_none'], '.3f')} "
                     f"| {fmt(r['mem_vs_none'], '.3f')} | {r['ideal']:.3f} |")
    return "\n".join(lines)


def join_process_group(device):
    """The launcher's process group (one GPU per process), or one of world size 1."""
    if dist.is_initialized():
        return
    cuda = device.startswith("cuda")
    if "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)


def main(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available: pass --device cpu")
    args.modes = args.modes or (["graph"] if args.device.startswith("cuda") else ["eager"])
    for backend in args.ssm_backends:  # before the first configuration runs, not after an hour of them
        try:
            ssm_ops.check_backend(backend)
        except ValueError as e:
            raise SystemExit(f"benchmark.py: error: --ssm-backends {backend}: {e}") from e
    if {"graph", "ddp"} & set(args.modes) and not args.device.startswith("cuda"):
        raise SystemExit("--modes graph and ddp need a CUDA device (the CPU runs eager and ddp-eager)")
    if any(m.startswith("ddp") for m in args.modes) or "WORLD_SIZE" in os.environ:
        join_process_group(args.device)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
           else "cpu", "command": " ".join(__import__("sys").argv)}
    results = []
    grid = itertools.product(args.models, args.ssm_backends, args.precisions, args.batch_sizes, args.modes,
                             args.variants, args.strategies)
    for model_name, backend, precision, batch_size, mode, variant, fusion in grid:
        r = measure(args, model_name, backend, fusion, precision, batch_size, mode, variant)
        if not main_process:
            continue
        print(f"{short_name(model_name)} {r['ssm_backend']} {precision} {mode} {variant} b{batch_size} "
              f"{r['strategy']}: {r['step_ms']:.1f} ms"
              + (f", {r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else ""), flush=True)
        results.append(r)
    if not main_process:
        return results
    add_ratios(results)
    table = markdown_table(results)
    print(f"\n{env['device']}, torch {env['torch']}\n{table}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"env": env, "results": results, "table": table}, f, indent=1)
    return results


if __name__ == "__main__":
    main(argparse.ArgumentParser("Famba-V benchmark", parents=[get_args_parser()]).parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
