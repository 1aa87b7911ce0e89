"""Samplers: repeated augmentation for training, unpadded sharding for evaluation, and the epoch tagging that
lets training-loader workers persist across epochs with per-epoch seeds."""
import math

import torch
from torch.utils.data import Sampler

import utils


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


class EpochSampler(Sampler):
    """Wraps a sampler so that every index carries the epoch it is drawn in: yields (epoch, index).

    With ``EpochSeededDataset`` this lets loader workers persist across epochs (no re-spawn at every epoch,
    which costs seconds with many workers) and still reseed at each epoch's first sample, from (seed, epoch,
    rank, worker id): the augmentations of epoch e are then the same whether the workers were started at
    epoch 0 or, in a resumed run, at epoch e. ``set_epoch`` is passed on to the wrapped sampler.
    """

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch  # now: the loader may start the next epoch's iterator before this one's last batch
        return ((epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class EpochSeededDataset(torch.utils.data.Dataset):
    """dataset[(epoch, index)] = dataset[index]; in a loader worker the random modules are first reseeded
    from (seed, epoch, rank, worker id) when the epoch changes. In the main process (no workers) nothing is
    reseeded here: main.py seeds it at every epoch start."""

    def __init__(self, dataset, seed, rank):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.seeded_epoch = None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        worker = torch.utils.data.get_worker_info()
        if worker is not None and epoch != self.seeded_epoch:
            utils.seed_everything(self.seed, epoch, self.rank, worker.id)
            self.seeded_epoch = epoch
        return self.dataset[index]


class EpochBatches:
    """One epoch's batches of a loader over an ``EpochSampler``, with ``len``; ``start(epoch)`` begins that
    epoch's iterator early, so that persistent workers load its first batches while the previous epoch is
    evaluated (otherwise every epoch opens with the workers' pipeline fill, seconds with many workers).

    Nothing here draws from the global random generators: the sampler shuffles with its own seed and epoch, the
    loader takes its base seeds from its own generator and the workers reseed per epoch, so starting early
    changes no random draw."""

    def __init__(self, loader):
        self.loader, self.started = loader, {}

    def start(self, epoch):
        if epoch not in self.started:
            self.loader.sampler.set_epoch(epoch)
            self.started = {epoch: iter(self.loader)}

    def __call__(self, epoch):
        self.start(epoch)
        return _Batches(self.started.pop(epoch), len(self.loader))


class _Batches:
    def __init__(self, iterator, length):
        self.iterator, self.length = iterator, length

    def __iter__(self):
        return self.iterator

    def __len__(self):
        return self.length
