"""kernels/fusion.py's fusion_map kernel at Vim-Ti's shapes (128 samples, 192 channels, r = 7, the class token
in the middle) under several launch settings (warps, channels per step, input precision of the scores' dot
products, "default" being fusion_map's for the dtype): microseconds per call (captured in a CUDA graph, so
without the launch's host time), and DIFF where the outputs differ from those of float32 FMA dot products of the
rows in float32 (8 warps, 32 channels, "fp32": the kernel before its dot products went to tensor cores).

    python scripts/fusion_map_benchmark.py
"""
import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fusion as kfusion  # noqa: E402

SETTINGS = ((8, 32, "fp32"), (8, 32, "default"), (4, 32, "default"), (8, 64, "default"))


def run(x, r, cls, warps, bc, precision):
    precision = kfusion.DOT_PRECISION[x.dtype] if precision == "default" else precision
    return kfusion.launch_fusion_map(x, r, cls, warps, bc, precision)


def main():
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (197, 127, 65):
            x = torch.randn(128, tokens, 192, device="cuda").to(dtype)
            reference = run(x.float(), 7, tokens // 2, 8, 32, "fp32")
            line = []
            for setting in SETTINGS:
                if dtype != torch.float32 and setting[2] != "default":   # 16-bit rows: one way only
                    continue
                same = all(torch.equal(a, b) for a, b in zip(run(x, 7, tokens // 2, *setting), reference))
                ms = triton.testing.do_bench_cudagraph(lambda: run(x, 7, tokens // 2, *setting), rep=50,
                                                       return_mode="median")
                warps, bc, precision = setting
                line.append(f"w{warps}/bc{bc}/{precision} {ms * 1e3:.1f}us{'' if same else ' DIFF'}")
            print(f"{str(dtype)[6:]} T={tokens}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
