"""kernels/fusion.py's fusion_map kernel at Vim-Ti's shapes (128 samples, 192 channels, r = 7, the class token
in the middle) under several launch settings (warps, channels per step): microseconds per call, and DIFF where
the outputs differ from those of 8 warps and 32 channels.

    python scripts/fusion_map_benchmark.py
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fusion as kfusion  # noqa: E402

SETTINGS = ((8, 32), (4, 32), (16, 32), (8, 64), (16, 16), (4, 64))   # (num_warps, BC)


def run(x, r, cls, warps, bc):
    return kfusion.launch_fusion_map(x, r, cls, warps, bc)


def main():
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (197, 127, 65):
            x = torch.randn(128, tokens, 192, device="cuda").to(dtype)
            reference = run(x, 7, tokens // 2, *SETTINGS[0])
            line = []
            for warps, bc in SETTINGS:
                same = all(torch.equal(a, b) for a, b in zip(run(x, 7, tokens // 2, warps, bc), reference))
                ms = triton.testing.do_bench(lambda: run(x, 7, tokens // 2, warps, bc), warmup=10, rep=50,
                                             return_mode="median")
                line.append(f"w{warps}/bc{bc} {ms * 1e3:.1f}us{'' if same else ' DIFF'}")
            print(f"{str(dtype)[6:]} T={tokens}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
