"""Do two DDP runs that differ only in how their gradients are bucketed, so only in the order in which the
all-reduce sums the processes' gradients, end with the same parameters?

    python scripts/allreduce_order.py --world 2 4 [--steps 200]

For each world size: two runs of a small Vim (4 layers, width 32, 32 px, pure-PyTorch mixer) over gloo on the CPU,
AdamW, each process its own random batches, with DDP's default 25 MB bucket (one bucket here) and with 1 kB
buckets (many). With two processes every sum is one addition, whatever the buckets, so the runs are bit for bit
equal; with more, the order of the additions depends on where a gradient lies in the buffer being reduced, so
the runs round differently. The same holds for the captured step's flat buffer against DDP's buckets (scripts/ddp_check.py).
"""
import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mamba  # noqa: E402

BUCKETS_MB = (25, 0.001)


def train(rank, world, bucket_mb, steps, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    model = models_mamba.VisionMamba(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10,
                                     drop_path_rate=0.0, ssm_backend='torch')
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=data), torch.randint(0, 10, (8,), generator=data)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--world', type=int, nargs='+', default=[2, 4])
    p.add_argument('--steps', type=int, default=200)
    p.add_argument('--scratch', default='/tmp', help='where the two runs save their parameters')
    args = p.parse_args()
    for world in args.world:
        states = []
        for bucket_mb in BUCKETS_MB:
            out = os.path.join(args.scratch, f'allreduce_order_w{world}_{bucket_mb}.pt')
            mp.spawn(train, args=(world, bucket_mb, args.steps, free_port(), out), nprocs=world)
            states.append(torch.load(out))
        a, b = states
        relative = {k: ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)).item()
                    for k in a if a[k].is_floating_point()}
        largest = sorted(relative, key=relative.get)[-3:][::-1]
        print(f'world {world}, {args.steps} steps: bit for bit equal {all(torch.equal(a[k], b[k]) for k in a)}; '
              'largest ||a - b|| / ||a||: ' + ', '.join(f'{k} {relative[k]:.2g}' for k in largest), flush=True)


if __name__ == '__main__':
    main()
