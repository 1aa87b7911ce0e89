"""The mixer's kernels alone, one Vim layer at a time: this repository's Triton scan and conv against mamba-ssm's
scan and causal-conv1d's conv doing the same layer's work (both directions, batch 128, E channels per direction,
d_state 16), forward and backward time against the token count, and their agreement.

    python scripts/scan_benchmark.py --lengths 197 129 33 --dtypes fp32 bf16 --conv --output scan.json

mamba-ssm's kernels take the channel-major layout ssm_ops's `cuda` backend gives them (a sequence next to its
flip, one B/C group per direction); the Triton kernels the token-major one of the `triton` backend. The inputs
are the same numbers in both layouts, and ``rel_diff`` is the worst relative difference of the output and of
du, dB, dC, dA to mamba-ssm's. Each side gets B and C as its backend's mixer hands them over (mamba-ssm: contiguous
copies; the Triton scan: kernels.scan.bc_rows of the x_dbl slice, a view in float32, and A stored (N, 2E)),
prepared outside the timing.
"""
import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssm_ops  # noqa: E402
from kernels import conv as kconv, scan as kscan  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(batch, e, n, rank, length, dtype):
    """Token-major inputs of one layer and the same numbers channel-major ([direction 0 ; flipped direction 1])."""
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    x = dict(xz=r(batch, length, 2 * e).to(dtype), u=r(2, batch, length, e).to(dtype),
             delta=(r(2, batch, length, e) * 0.5 - 1).to(dtype), x_dbl=r(2, batch, length, rank + 2 * n).to(dtype),
             A=-torch.rand(2 * e, n, device="cuda") * 2 - 0.1, D=r(2 * e), delta_bias=r(2 * e) * 0.3,
             conv_w=r(2 * e, 4) * 0.5, conv_b=r(2 * e), dout=r(batch, length, e).to(dtype),
             dconv=r(2, batch, length, e).to(dtype))
    x["BC"] = x["x_dbl"][..., rank:]
    x["BC_rows"] = kscan.bc_rows(x["BC"])
    x["A_nmajor"] = x["A"].t().contiguous().t()   # stored (N, 2E), as models_mamba.stacked_params hands it over
    x["B"], x["C"] = x["BC"][..., :n], x["BC"][..., n:]
    x["z"] = x["xz"][..., e:]

    def cm(fwd, bwd):  # (B, L, E) twice -> (B, 2E, L) [fwd ; bwd flipped], contiguous
        return torch.cat([fwd, bwd.flip(1)], 2).transpose(1, 2).contiguous()
    x["cm"] = dict(u=cm(x["u"][0], x["u"][1]), delta=cm(x["delta"][0], x["delta"][1]),
                   B=torch.stack([x["B"][0], x["B"][1].flip(1)], 1).transpose(2, 3).contiguous(),
                   C=torch.stack([x["C"][0], x["C"][1].flip(1)], 1).transpose(2, 3).contiguous(),
                   z=cm(x["z"], x["z"]), dout=cm(x["dout"], x["dout"]), x=cm(x["xz"][..., :e], x["xz"][..., :e]),
                   dconv=cm(x["dconv"][0], x["dconv"][1]))
    return x


def _folded(t):  # (B, 2E, L) channel-major -> (B, L, E): direction 0 plus direction 1 flipped back
    e = t.shape[1] // 2
    return (t[:, :e].float() + t[:, e:].float().flip(-1)).transpose(1, 2)


def _unmirrored(t):  # (B, 2E, L) -> (2, B, L, E) at the original token positions
    e = t.shape[1] // 2
    return torch.stack([t[:, :e], t[:, e:].flip(-1)]).transpose(2, 3).float()


def scan_kernels():
    """name -> (fwd(x) -> saved, bwd(x, saved) -> comparable tensors (out_z, du, dB, dC, dA))."""
    found = {}
    if ssm_ops.MAMBA_SCAN_AVAILABLE:
        def fwd(x):
            c = x["cm"]
            return ssm_ops._scan_fwd(c["u"], c["delta"], x["A"], c["B"], c["C"], x["D"], c["z"], x["delta_bias"])

        def bwd(x, saved):
            c = x["cm"]
            out, states, out_z = saved
            du, _, dA, dB, dC = ssm_ops._scan_bwd(c["u"], c["delta"], x["A"], c["B"], c["C"], x["D"], c["z"],
                                                  x["delta_bias"], c["dout"], states, out)[:5]
            return (_folded(out_z), _unmirrored(du), dB[:, 0].transpose(1, 2), dC[:, 0].transpose(1, 2), dA)
        found["mamba scan"] = (fwd, bwd)

    def fwd(x):
        return kscan.scan_fwd(x["u"], x["delta"], x["BC_rows"], x["z"], x["A_nmajor"], x["D"], x["delta_bias"])

    def bwd(x, saved):
        y, out_z, states = saved
        dz = torch.empty_like(x["xz"])[..., x["z"].shape[-1]:]
        du, _, dA, dbc = kscan.scan_bwd(x["u"], x["delta"], x["BC_rows"], x["z"], x["A_nmajor"], x["D"],
                                        x["delta_bias"], x["dout"], y, states, dz)[:4]
        n = x["A"].shape[1]
        return out_z.float(), du.float(), dbc[0, ..., :n], dbc[0, ..., n:], dA
    found["triton scan"] = (fwd, bwd)
    return found


def conv_kernels():
    found = {}
    if ssm_ops.CONV_AVAILABLE:
        found["causal-conv1d"] = (
            lambda x: ssm_ops._conv_fwd(x["cm"]["x"], x["conv_w"], x["conv_b"]),
            lambda x, saved: [_unmirrored(saved)] + [
                g.float() for g in ssm_ops._conv_bwd(x["cm"]["x"], x["conv_w"], x["conv_b"], x["cm"]["dconv"])[1:]])

    def bwd(x, saved):
        dx = torch.empty_like(x["xz"])[..., :x["z"].shape[-1]]
        return [saved.float()] + [g.float() for g in kconv.conv_bwd(x["xz"][..., :x["z"].shape[-1]], x["conv_w"],
                                                                    x["conv_b"], x["dconv"], dx)]
    found["triton conv"] = (lambda x: kconv.conv_fwd(x["xz"][..., :x["z"].shape[-1]], x["conv_w"], x["conv_b"]), bwd)
    return found


def median_ms(fn):
    """GPU time of fn: many calls captured in one CUDA graph (as the training step runs them), so that the host's
    launch time, tens of microseconds per call, does not count where a kernel is shorter than its launch."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def main(args):
    rows = []
    families = [scan_kernels()] + ([conv_kernels()] if args.conv else [])
    for dname in args.dtypes:
        for length in args.lengths:
            x = make_inputs(args.batch, args.channels // 2, args.d_state, args.dt_rank, length, DTYPES[dname])
            for family in families:
                reference = None
                for name, (fwd, bwd) in family.items():
                    saved = fwd(x)
                    result = bwd(x, saved)
                    if reference is None:
                        reference, err = result, 0.0
                    else:
                        err = max(((p.float() - q.float()).norm() / q.float().norm()).item()
                                  for p, q in zip(result, reference))
                    row = dict(dtype=dname, length=length, kernel=name, fwd_ms=median_ms(lambda: fwd(x)),
                               bwd_ms=median_ms(lambda: bwd(x, saved)), rel_diff=err)
                    rows.append(row)
                    print(f"{dname} L={length} {name}: fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms, "
                          f"rel diff {err:.1e}", flush=True)
    base = {(r["dtype"], r["length"], r["kernel"].split()[-1] if r["kernel"] != "causal-conv1d" else "conv"):
            r["fwd_ms"] + r["bwd_ms"] for r in rows if r["kernel"] in ("mamba scan", "causal-conv1d")}
    print(f"\n{torch.cuda.get_device_name()}: batch {args.batch}, channels {args.channels} (both directions), "
          f"d_state {args.d_state}\n| dtype | kernel | L | fwd ms | bwd ms | fwd+bwd vs mamba-ssm / causal-conv1d "
          "| rel diff |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = base.get((r["dtype"], r["length"], "conv" if "conv" in r["kernel"] else "scan"))
        ratio = f"{(r['fwd_ms'] + r['bwd_ms']) / ref:.3f}" if ref else "-"
        print(f"| {r['dtype']} | {r['kernel']} | {r['length']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {ratio} "
              f"| {r['rel_diff']:.1e} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser("mixer kernel benchmark")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, default=768, help="2 * d_inner (both directions)")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--dt-rank", type=int, default=12)
    p.add_argument("--lengths", type=int, nargs="+", default=[197, 129, 33])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--conv", action="store_true", help="also time the conv kernels")
    p.add_argument("--output", default="")
    main(p.parse_args())
