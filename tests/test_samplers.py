"""RASampler and DistributedEvalSampler against hand-checked properties."""
from collections import Counter

import pytest

from samplers import DistributedEvalSampler, RASampler


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
