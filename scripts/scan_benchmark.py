"""The mixer's kernels alone: mamba-ssm's scan and causal-conv1d's conv against the Triton kernels, forward and
backward time against sequence length, and their agreement. Shapes are one Vim layer's both-direction call
(channels = 2 * d_inner, one B/C group per direction); lengths are token counts the fusion schedules produce.

    python scripts/scan_benchmark.py --batch 128 --channels 768 --lengths 197 161 129 128 97 33 \
        --configs 8:8:1:4:2 16:4:2:4:2 --conv --output scan.json

A config is fwd_chunk:fwd_channels:fwd_warps:bwd_channels:bwd_warps (kernels_triton's scan knobs); ``default``
(the default) is kernels_triton's own setting (FWD_* and BWD_*).
"""
import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels_triton as kt  # noqa: E402
import ssm_ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, channels, groups, n, length, dtype):
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    return dict(u=r(batch, channels, length).to(dtype), delta=(r(batch, channels, length) * 0.5 - 1).to(dtype),
                A=-torch.rand(channels, n, device="cuda") * 2 - 0.1, B=r(batch, groups, n, length).to(dtype),
                C=r(batch, groups, n, length).to(dtype), D=r(channels), z=r(batch, channels, length).to(dtype),
                delta_bias=r(channels) * 0.3, conv_w=r(channels, 4) * 0.5)


def scan_kernels(configs):
    """name -> (fwd(x) -> (out, saved), bwd(x, dout, out, saved) -> tensors to compare)."""
    found = {}
    if ssm_ops.MAMBA_SCAN_AVAILABLE:
        def fwd(x):
            out, states, out_z = ssm_ops._scan_fwd(*(x[k] for k in SCAN_ARGS))
            return out_z, (states, out)
        found["mamba scan"] = (fwd, lambda x, g, o, s: ssm_ops._scan_bwd(*(x[k] for k in SCAN_ARGS), g, *s)[:8])
    for chunk, fch, fw, bch, bw in configs:
        def fwd(x, chunk=chunk, fch=fch, fw=fw):
            out, states, out_z = kt.scan_fwd(*(x[k] for k in SCAN_ARGS), chunk=chunk, channels=fch, warps=fw)
            return out_z, (states, out)

        def bwd(x, g, o, s, bch=bch, bw=bw):
            return kt.scan_bwd(*(x[k] for k in SCAN_ARGS), g, *s, channels=bch, warps=bw)[:8]
        found["triton scan " + ("default" if chunk is None else f"{chunk}:{fch}:{fw}:{bch}:{bw}")] = (fwd, bwd)
    return found


def conv_kernels():
    found = {}
    if ssm_ops.CONV_AVAILABLE:
        found["causal-conv1d"] = (lambda x: (ssm_ops._conv_fwd(x["u"], x["conv_w"], x["D"]), None),
                                  lambda x, g, o, s: ssm_ops._conv_bwd(x["u"], x["conv_w"], x["D"], g))
    found["triton conv"] = (lambda x: (kt.conv_fwd(x["u"], x["conv_w"], x["D"]), None),
                            lambda x, g, o, s: kt.conv_bwd(x["u"], x["conv_w"], x["D"], g))
    return found


def median_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(args):
    rows = []
    configs = [(None,) * 5 if c == "default" else tuple(int(v) for v in c.split(":")) for c in args.configs]
    families = [scan_kernels(configs)] + ([conv_kernels()] if args.conv else [])
    for dname in args.dtypes:
        for length in args.lengths:
            x = make_inputs(args.batch, args.channels, args.groups, args.d_state, length, DTYPES[dname])
            dout = torch.randn_like(x["u"])
            for family in families:
                reference = None
                for name, (fwd, bwd) in family.items():
                    out, saved = fwd(x)
                    result = [out] + list(bwd(x, dout, out, saved))
                    if reference is None:
                        reference, err = result, 0.0
                    else:  # worst relative difference to the family's first kernel: output and every gradient
                        err = max(((p.float() - q.float()).norm() / q.float().norm()).item()
                                  for p, q in zip(result, reference))
                    row = dict(dtype=dname, length=length, kernel=name, fwd_ms=median_ms(lambda: fwd(x)),
                               bwd_ms=median_ms(lambda: bwd(x, dout, out, saved)), rel_diff=err)
                    rows.append(row)
                    print(f"{dname} L={length} {name}: fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms, "
                          f"rel diff {err:.1e}", flush=True)
    longest = max(args.lengths)
    base = {(r["dtype"], r["kernel"]): r["fwd_ms"] + r["bwd_ms"] for r in rows if r["length"] == longest}
    print(f"\n{torch.cuda.get_device_name()}: batch {args.batch}, channels {args.channels}, d_state {args.d_state}\n"
          f"| dtype | kernel | L | fwd ms | bwd ms | fwd+bwd vs L={longest} | rel diff |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = (r["fwd_ms"] + r["bwd_ms"]) / base[(r["dtype"], r["kernel"])]
        print(f"| {r['dtype']} | {r['kernel']} | {r['length']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} "
              f"| {ratio:.3f} | {r['rel_diff']:.1e} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser("mixer kernel benchmark")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, default=768, help="2 * d_inner (both directions)")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[197, 188, 161, 129, 128, 97, 65, 33, 17])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--configs", nargs="+", default=["default"])
    p.add_argument("--conv", action="store_true", help="also time the conv kernels")
    p.add_argument("--output", default="")
    main(p.parse_args())
