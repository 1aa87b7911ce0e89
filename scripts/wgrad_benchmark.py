"""The mixer's weight-gradient GEMMs for one Vim-Ti layer (batch 128): per-sample GEMMs and a batch sum, as
ssm_ops does them, against one GEMM over all B*L tokens, at several token counts, fp32 and bf16. Prints the
median ms of each as per-sample/one-GEMM.

    python scripts/wgrad_benchmark.py
"""
import torch
import triton.testing

B, DM, E, K, R = 128, 192, 384, 44, 12   # batch, d_model, channels per direction, x_proj outputs, dt rank


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def batch_sum(t):
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32))


def main():
    for dtype in (torch.float32, torch.bfloat16):
        for length in (197, 160, 129, 97, 65, 36):
            r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
            dout, out_z = r(B, length, DM), r(B, length, E)
            ddelta, x_dbl = r(2 * B, length, E), r(2, B * length, K)
            u, dx_dbl = r(2, B * length, E), r(2, B * length, K)
            per_sample = {   # as ssm_ops.BiMambaTritonFn.backward: sums over the batch, per direction
                "out_proj": lambda: batch_sum(torch.matmul(dout.transpose(1, 2), out_z)),
                "dt_proj": lambda: batch_sum(torch.bmm(ddelta.transpose(1, 2), x_dbl.view(2 * B, length, K)[..., :R])
                                             .view(2, B, E, R).transpose(0, 1)),
                "x_proj": lambda: batch_sum(torch.bmm(dx_dbl.view(2 * B, length, K).transpose(1, 2),
                                                      u.view(2 * B, length, E)).view(2, B, K, E).transpose(0, 1)),
            }
            one_gemm = {
                "out_proj": lambda: torch.mm(dout.reshape(-1, DM).t(), out_z.reshape(-1, E)).float(),
                "dt_proj": lambda: torch.bmm(ddelta.view(2, B * length, E).transpose(1, 2), x_dbl[..., :R]).float(),
                "x_proj": lambda: torch.bmm(dx_dbl.transpose(1, 2), u).float(),
            }
            print(f"{str(dtype)[6:]} L={length}: " + "  ".join(
                f"{name} {bench(per_sample[name]):.3f}/{bench(one_gemm[name]):.3f}" for name in per_sample), flush=True)


if __name__ == "__main__":
    main()
