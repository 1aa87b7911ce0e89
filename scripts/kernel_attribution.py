"""Which op launched each GPU kernel of one eager Vim training step, with the op's input shapes and strides,
and where the step's host time goes: to see why a fused step runs GEMM kernels that the no-fusion step does
not (cuBLAS picks its kernel from shapes and alignment), and what an eager step spends on the host.

    python scripts/kernel_attribution.py --strategies none all:7 --precisions fp32 bf16 --output attribution.json

Per configuration it prints the GEMM kernels by (kernel, op, input dims, strides) with their GPU time, the
kernels that run only in the fused step, the host time of the 25 most expensive ops (self time), and the
number of kernel launches per step. The step is the eager one (engine.build_train_step, cuda_graph=False):
a captured step replays the same kernels, but its replay names no ops.
"""
import argparse
import collections
import json
import os
import sys
import tempfile

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402,F401  (registers the Vim models)
from benchmark import PRECISIONS, parse_strategy, strategy_label  # noqa: E402
from engine import build_train_step  # noqa: E402

GEMM_WORDS = ("gemm", "wmma", "nvjet", "xmma", "cutlass")


def trace_step(model_name, fusion, precision, batch):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=100, drop_path_rate=0.0, **fusion).cuda()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=5e-4, weight_decay=0.1, fused=True)
    step = build_train_step(model, SoftTargetCrossEntropy(), optimizer, loss_scaler=None, clip_grad=None,
                            amp_dtype=PRECISIONS[precision], cuda_graph=False)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    targets = torch.randn(batch, 100, device="cuda").softmax(-1)
    for _ in range(3):
        step(images, targets)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step(images, targets)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    host = [dict(op=e.key, self_cpu_us=e.self_cpu_time_total, calls=e.count)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
    del model, optimizer, step
    return events, host


def attribute(events):
    """Trace events -> {(kernel, op, dims, strides, types): [us, launches]} and the launch count."""
    ops = {e["args"]["External id"]: e for e in events
           if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}
    kernels = collections.defaultdict(lambda: [0.0, 0])
    launches = 0
    for e in events:
        if e.get("cat") == "cuda_runtime" and "aunch" in e.get("name", ""):
            launches += 1
        if e.get("cat") != "kernel":
            continue
        op = ops.get(e.get("args", {}).get("External id"), {})
        args = op.get("args", {})
        key = (e["name"], op.get("name", "?"), json.dumps(args.get("Input Dims")),
               json.dumps(args.get("Input Strides")), json.dumps(args.get("Input type")))
        kernels[key][0] += e.get("dur", 0.0)
        kernels[key][1] += 1
    return kernels, launches


def main(args):
    report = []
    for precision in args.precisions:
        per_strategy = {}
        for fusion in args.strategies:
            label = strategy_label(fusion)
            events, host = trace_step(args.model, fusion, precision, args.batch_size)
            kernels, launches = attribute(events)
            per_strategy[label] = kernels
            gemms = sorted(((k, v) for k, v in kernels.items() if any(w in k[0].lower() for w in GEMM_WORDS)),
                           key=lambda kv: -kv[1][0])
            print(f"\n== {precision} {label}: {launches} launches, "
                  f"{sum(v[0] for v in kernels.values()) / 1e3:.2f} ms of kernels")
            for (name, op, dims, strides, types), (us, n) in gemms[:40]:
                print(f"{us:9.1f} us {n:4d}x {name[:90]}\n      {op} {dims} strides {strides} {types}")
            print("host (self CPU us):")
            for h in host:
                print(f"  {h['self_cpu_us']:10.0f} {h['calls']:6d}  {h['op']}")
            report.append(dict(precision=precision, strategy=label, launches=launches, host=host,
                               kernels=[dict(kernel=k[0], op=k[1], dims=k[2], strides=k[3], types=k[4],
                                             us=v[0], count=v[1]) for k, v in kernels.items()]))
        base = per_strategy.get("none")
        if base is None:
            continue
        base_names = {k[0] for k in base}
        for label, kernels in per_strategy.items():
            if label == "none":
                continue
            only = collections.defaultdict(lambda: [0.0, 0])
            for k, (us, n) in kernels.items():
                if k[0] not in base_names:
                    only[k[0]][0] += us
                    only[k[0]][1] += n
            print(f"\n== {precision} {label}: kernels the no-fusion step does not run "
                  f"({sum(v[0] for v in only.values()) / 1e3:.2f} ms)")
            for name, (us, n) in sorted(only.items(), key=lambda kv: -kv[1][0])[:25]:
                print(f"{us:9.1f} us {n:4d}x {name[:110]}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": report}, f)


if __name__ == "__main__":
    p = argparse.ArgumentParser("kernel attribution of one eager training step")
    p.add_argument("--model",
                   default="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
    p.add_argument("--strategies", nargs="+", type=parse_strategy,
                   default=[parse_strategy(s) for s in ("none", "all:7")])
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output", default="")
    main(p.parse_args())
