"""kernels/fusion.py's merge (merge_rows) and its transpose (gather_rows) at the fusion's shapes: batch 128, a
bfloat16 hidden and a float32 residual stream, r = 7, Vim-Ti's and Vim-S's widths, 197 / 120 / 40 tokens entering.
GPU microseconds per call (20 calls captured in a CUDA graph, median of 15 replays, so without the launch's host
time) for the merge without and with ``counts`` (rows of group size 1 skip the search for fused rows) and for the
transpose with 1 and 4 rows per program.

    python scripts/merge_benchmark.py
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fusion as kfusion  # noqa: E402


def gpu_us(fn, calls=20, replays=15):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # compile and warm up outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for i in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main():
    print(torch.cuda.get_device_name())
    for channels in (192, 384):
        for tokens in (197, 120, 40):
            r = 7
            x = torch.randn(128, tokens, channels, device="cuda").bfloat16()
            residual = torch.randn(128, tokens, channels, device="cuda")
            src, keep, dst, dest, weight, _ = kfusion.fusion_map(x, r, tokens // 2)
            grads = [torch.randn(128, tokens - r, channels, device="cuda").bfloat16(),
                     torch.randn(128, tokens - r, channels, device="cuda")]
            merge = {counts: gpu_us(lambda: kfusion.merge_rows([x, residual], keep, src, dst, weight, counts))
                     for counts in (False, True)}
            gather, default = {}, kfusion.GATHER_ROWS
            for rows in (1, 4):
                kfusion.GATHER_ROWS = rows
                gather[rows] = gpu_us(lambda: kfusion.gather_rows(grads, dest, weight))
            kfusion.GATHER_ROWS = default
            print(f"C={channels} T={tokens}: merge {merge[False]:.1f} us, with counts {merge[True]:.1f} us; "
                  f"transpose 1 row / program {gather[1]:.1f} us, 4 rows {gather[4]:.1f} us", flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
