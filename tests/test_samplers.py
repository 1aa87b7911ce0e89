"""RASampler, DistributedEvalSampler and the epoch-seeded loader workers against hand-checked properties."""
from collections import Counter

import pytest
import torch

from samplers import DistributedEvalSampler, EpochBatches, EpochSampler, EpochSeededDataset, RASampler


def shards(n, world, **kw):
    return [list(RASampler(range(n), num_replicas=world, rank=r, **kw)) for r in range(world)]


def test_ra_sampler_deals_each_image_to_three_processes():
    n, world = 20, 3
    parts = shards(n, world, seed=1)
    assert [len(p) for p in parts] == [7, 7, 7]  # ceil(20 / 3) per process, as without repetition
    # without shuffling the stream is 0,0,0,1,1,1,...: rank r gets every 3rd element -> 0..6 on every rank
    assert shards(n, world, shuffle=False) == [list(range(7))] * 3
    # with shuffling, each chosen image appears once on each of the 3 processes (copies never share a rank)
    for p in parts:
        assert len(set(p)) == len(p)
    counts = Counter(i for p in parts for i in p)
    assert set(counts.values()) == {3} and len(counts) == 7


def test_ra_sampler_epochs_and_seeds():
    a = RASampler(range(50), num_replicas=2, rank=0, seed=0)
    first = list(a)
    assert list(a) == first  # same epoch -> same order
    a.set_epoch(1)
    assert list(a) != first
    b = RASampler(range(50), num_replicas=2, rank=0, seed=0)
    b.set_epoch(1)
    assert list(b) == list(a)


def test_ra_sampler_single_repeat_is_a_padded_partition():
    parts = shards(10, 4, num_repeats=1, seed=3)
    assert [len(p) for p in parts] == [3] * 4
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(10)) and len(flat) == 12  # 2 padded from the start of the stream


def test_ra_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RASampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        RASampler(range(4), num_replicas=2, rank=0, num_repeats=0)


def test_eval_sampler_partitions_exactly_without_padding():
    parts = [list(DistributedEvalSampler(range(25), 2, r)) for r in range(2)]
    assert parts[0] == list(range(0, 25, 2)) and parts[1] == list(range(1, 25, 2))
    assert [len(DistributedEvalSampler(range(25), 2, r)) for r in range(2)] == [13, 12]
    assert sorted(parts[0] + parts[1]) == list(range(25))


class RandomDraws(torch.utils.data.Dataset):
    """Item i = (i, a draw from each random module): the state a worker's augmentations would see."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        import random

        import numpy as np
        return torch.tensor([float(i), random.random(), float(np.random.rand()), torch.rand(()).item()])


def _epoch_batches(loader, sampler, epochs):
    out = {}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out[epoch] = torch.cat(list(loader))
    return out


def test_persistent_workers_reseed_per_epoch_as_a_resumed_run_would():
    def loader():
        sampler = EpochSampler(torch.utils.data.SequentialSampler(range(12)))
        return torch.utils.data.DataLoader(EpochSeededDataset(RandomDraws(), seed=0, rank=0), sampler=sampler,
                                           batch_size=3, num_workers=2, persistent_workers=True), sampler
    uninterrupted = _epoch_batches(*loader(), [0, 1, 2])
    resumed = _epoch_batches(*loader(), [2])  # workers started at epoch 2
    assert torch.equal(resumed[2], uninterrupted[2])
    assert torch.equal(uninterrupted[2][:, 0], torch.arange(12.0))  # the epoch tag is stripped: items in order
    assert not torch.equal(uninterrupted[1][:, 1:], uninterrupted[2][:, 1:])  # a new epoch draws anew, in all
    for column in (1, 2, 3):                                                    # three random modules
        assert not torch.equal(uninterrupted[1][:, column], uninterrupted[2][:, column])


def test_epoch_batches_started_early_are_the_batches_of_that_epoch_and_draw_nothing_global():
    def loader():
        sampler = EpochSampler(torch.utils.data.DistributedSampler(range(12), num_replicas=1, rank=0, seed=3))
        return torch.utils.data.DataLoader(EpochSeededDataset(RandomDraws(), seed=0, rank=0), sampler=sampler,
                                           batch_size=3, num_workers=2, persistent_workers=True,
                                           generator=torch.Generator())
    plain, early = EpochBatches(loader()), EpochBatches(loader())
    reference = [torch.cat(list(plain(epoch))) for epoch in (0, 1)]
    first = early(0)
    assert len(first) == 4
    batches = [torch.cat(list(first))]
    torch.manual_seed(5)
    early.start(1)  # as main.py before the evaluation: epoch 1's workers start, the global generator is untouched
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    batches.append(torch.cat(list(early(1))))
    for got, want in zip(batches, reference):
        assert torch.equal(got, want)
    assert sorted(batches[1][:, 0].tolist()) == list(range(12)) and batches[1][:, 0].tolist() != list(range(12))
