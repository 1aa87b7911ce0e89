"""The mixer's weight gradients for one Vim-Ti layer (batch 128), as ssm_ops.weight_gradients forms them:
GEMMs over groups of samples and a sum over the groups, with one sample per group, with ssm_ops's groups
(_samples_per_gemm: up to 256 tokens per GEMM) and with one group of all B*L tokens, at several token counts,
fp32 and bf16. Prints the median ms of the three gradients together as per-sample/ssm_ops/one-GEMM, timed in CUDA
graphs. (Until 9143305 the script timed each gradient on its own: results/wgrad_grouped_h200.txt.)

    python scripts/wgrad_benchmark.py
"""
import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ssm_ops import _samples_per_gemm, weight_gradients  # noqa: E402

B, DM, E = 128, 192, 384   # batch, d_model, channels per direction
# x_proj outputs and dt rank as the model runs them: 44 and 12, padded to 48 and 16 for 2-byte GEMMs (pad_dt_rank)
K_R = {torch.float32: (44, 12), torch.bfloat16: (48, 16)}


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def main():
    for dtype in (torch.float32, torch.bfloat16):
        k, rank = K_R[dtype]
        for length in (197, 160, 129, 97, 65, 36):
            r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
            tensors = (r(B, length, DM), r(B, length, E), r(2, B, length, E), r(2, B * length, k),
                       r(2, B * length, k), r(2, B, length, E), rank)
            groups = (1, _samples_per_gemm(B, length), B)
            print(f"{str(dtype)[6:]} L={length} (ssm_ops: {groups[1]} per GEMM): "
                  + "/".join(f"{bench(lambda: weight_gradients(*tensors, g)):.3f}" for g in groups), flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
