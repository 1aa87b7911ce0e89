"""Distributed samplers: repeated augmentation for training, unpadded sharding for evaluation."""
import math

import torch
from torch.utils.data import Sampler


class RASampler(Sampler):
    """Repeated-augmentation sampler (Hoffer et al. 2020; DeiT's ``--repeated-aug``).

    Each epoch shuffles the dataset, repeats every index ``num_repeats`` times in a row and deals the
    stream out to the processes round-robin, so the copies of one image land on different processes
    (different random augmentations of it in one global batch). Each process takes
    ceil(len(dataset) / num_replicas) indices, so an epoch has as many steps as without repetition
    but sees about 1/num_repeats of the distinct images. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3, seed=0):
        if num_replicas is None or rank is None:
            if not torch.distributed.is_available() or not torch.distributed.is_initialized():
                raise RuntimeError('RASampler needs num_replicas and rank, or an initialised process group')
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / num_replicas)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        stream = order.repeat_interleave(self.num_repeats).tolist()
        total = self.num_samples * self.num_replicas
        if len(stream) < total:  # only when num_repeats == 1 and n does not divide evenly
            stream += stream[:total - len(stream)]
        return iter(stream[self.rank:total:self.num_replicas])

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


class DistributedEvalSampler(Sampler):
    """Shards an evaluation set over processes without padding or dropping: process r gets indices
    r, r + W, r + 2W, ... so the summed counts over processes are exactly the whole set."""

    def __init__(self, dataset, num_replicas, rank):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self):
        return len(range(self.rank, len(self.dataset), self.num_replicas))
