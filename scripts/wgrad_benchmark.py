"""The mixer's weight-gradient GEMMs for one Vim-Ti layer (batch 128): GEMMs over groups of samples and a sum
over the groups, with one sample per group, with ssm_ops's groups (_samples_per_gemm: up to 256 tokens per
GEMM) and with one group of all B*L tokens, at several token counts, fp32 and bf16. Prints the median ms of
each as per-sample/ssm_ops/one-GEMM, timed in CUDA graphs.

    python scripts/wgrad_benchmark.py
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ssm_ops import _samples_per_gemm  # noqa: E402

B, DM, E = 128, 192, 384   # batch, d_model, channels per direction
# x_proj outputs and dt rank as the model runs them: 44 and 12, padded to 48 and 16 for 2-byte GEMMs (pad_dt_rank)
K_R = {torch.float32: (44, 12), torch.bfloat16: (48, 16)}


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def batch_sum(t):
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32))


def wgrads(dout, out_z, ddelta, x_dbl, dx_dbl, u, g):
    """The three weight gradients as ssm_ops.BiMambaTritonFn.backward forms them, with g samples per GEMM."""
    b, length = dout.shape[:2]
    K, R = K_R[dout.dtype]
    groups = 2 * b // g
    return {
        "out_proj": lambda: batch_sum(torch.matmul(dout.reshape(b // g, g * length, DM).transpose(1, 2),
                                                   out_z.view(b // g, g * length, E))),
        "dt_proj": lambda: batch_sum(torch.bmm(ddelta.view(groups, g * length, E).transpose(1, 2),
                                               x_dbl.view(groups, g * length, K)[..., :R])
                                     .view(2, b // g, E, R).transpose(0, 1)),
        "x_proj": lambda: batch_sum(torch.bmm(dx_dbl.view(groups, g * length, K).transpose(1, 2),
                                              u.view(groups, g * length, E)).view(2, b // g, K, E).transpose(0, 1)),
    }


def main():
    for dtype in (torch.float32, torch.bfloat16):
        for length in (197, 160, 129, 97, 65, 36):
            r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
            k = K_R[dtype][0]
            tensors = (r(B, length, DM), r(B, length, E), r(2 * B, length, E), r(2, B * length, k),
                       r(2, B * length, k), r(2, B * length, E))
            ways = [wgrads(*tensors, g) for g in (1, _samples_per_gemm(B, length), B)]
            print(f"{str(dtype)[6:]} L={length} (ssm_ops: {_samples_per_gemm(B, length)} per GEMM): " + "  ".join(
                f"{name} " + "/".join(f"{bench(way[name]):.3f}" for way in ways) for name in ways[0]), flush=True)


if __name__ == "__main__":
    main()
