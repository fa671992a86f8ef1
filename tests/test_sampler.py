"""The sign-cycled sampler (docs/design.md §4): cycle, weights, exhaustion, repeats, epochs,
resume, ranks. Backends are built in memory: the sampler never opens a file."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from slider_cn.config import ConfigError
from slider_cn.data.backends import Backend, Sample
from slider_cn.data.sampler import SliderSampler, preview


def backend(id, n, strength=0.0, probability=1.0, repeats=0):
    samples = [Sample(Path(f"/d/{id}/{i:03d}.png"), f"{i:03d}", id) for i in range(n)]
    return Backend(id, samples, strength, probability, repeats, resolution=64)


def signs(plans):
    return "".join(p.sign for p in plans)


def epoch_plans(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_cycle_with_three_groups():
    sampler = SliderSampler(
        [backend("plus", 6, 0.5), backend("minus", 6, -0.5), backend("neutral", 6)], 2, seed=1
    )
    plans = epoch_plans(sampler, 0)
    assert signs(plans) == "+-0" * 3
    assert len(plans) == len(sampler) == 9
    assert [p.step for p in plans] == list(range(9))
    for plan in plans:
        assert len(plan.samples) == 2
        assert all(s.caption == plan.backend for s in plan.samples)  # never mixes backends
        assert plan.slider_strength == {"+": 0.5, "-": -0.5, "0": 0.0}[plan.sign]


def test_cycle_with_two_groups_and_config_order_irrelevant():
    # Listing the negative backend first does not change the + -> - order.
    sampler = SliderSampler([backend("minus", 4, -1.0), backend("plus", 4, 1.0)], 1, seed=3)
    assert signs(epoch_plans(sampler, 0)) == "+-" * 4
    only_neg_neutral = SliderSampler([backend("n", 3), backend("m", 3, -0.5)], 1, seed=3)
    assert signs(epoch_plans(only_neg_neutral, 0)) == "-0" * 3


def test_exhausted_group_leaves_the_cycle_mid_epoch():
    sampler = SliderSampler(
        [backend("plus", 4, 0.5), backend("minus", 2, -0.5), backend("neutral", 4)], 1, seed=0
    )
    assert signs(epoch_plans(sampler, 0)) == "+-0+-0" + "+0+0"


def test_exhausted_backend_leaves_its_group():
    # Two positive backends: the small one runs out, the big one fills every later + turn.
    small, big = backend("small", 2, 1.0, probability=100.0), backend("big", 6, 1.0)
    sampler = SliderSampler([small, big, backend("minus", 8, -1.0)], 1, seed=5)
    plans = epoch_plans(sampler, 0)
    positive = [p.backend for p in plans if p.sign == "+"]
    assert Counter(positive) == {"small": 2, "big": 6}
    last_small = max(i for i, b in enumerate(positive) if b == "small")
    assert set(positive[last_small + 1 :]) == {"big"}
    assert signs(plans) == "+-" * 8


def test_probability_weights_the_draw_inside_a_group():
    def fraction_heavy(p_heavy, p_light, seed):
        heavy = backend("heavy", 4, 1.0, probability=p_heavy, repeats=99)  # 400 samples
        light = backend("light", 4, 1.0, probability=p_light, repeats=99)
        sampler = SliderSampler([heavy, light, backend("minus", 8, -1.0, repeats=99)], 1, seed)
        first = [p.backend for p in epoch_plans(sampler, 0) if p.sign == "+"][:200]
        return first.count("heavy") / len(first)

    # 3:1 weights -> about 75 % of the first 200 positive draws (neither runs out by then).
    assert 0.65 < fraction_heavy(3.0, 1.0, seed=11) < 0.85
    assert 0.15 < fraction_heavy(1.0, 3.0, seed=11) < 0.35
    assert 0.40 < fraction_heavy(1.0, 1.0, seed=12) < 0.60


def test_repeats_are_extra_passes():
    once = SliderSampler([backend("a", 3)], 1, seed=0)
    assert Counter(p.samples[0].key for p in epoch_plans(once, 0)) == {
        "000": 1,
        "001": 1,
        "002": 1,
    }
    thrice = SliderSampler([backend("a", 3, repeats=2)], 1, seed=0)
    counts = Counter(p.samples[0].key for p in epoch_plans(thrice, 0))
    assert counts == {"000": 3, "001": 3, "002": 3}
    # Each pass is its own shuffle: every image appears once in each block of three.
    keys = [p.samples[0].key for p in epoch_plans(thrice, 1)]
    assert all(sorted(keys[i : i + 3]) == ["000", "001", "002"] for i in (0, 3, 6))


def test_remainder_smaller_than_a_batch_is_dropped():
    # 5 samples, batch 2: two full batches per epoch, one sample left over, a different one
    # each epoch (so over epochs every image is used).
    sampler = SliderSampler([backend("a", 5)], 2, seed=0)
    assert len(sampler) == 2
    unused = set()
    for epoch in range(6):
        plans = epoch_plans(sampler, epoch)
        assert [len(p.samples) for p in plans] == [2, 2]
        used = [s.key for p in plans for s in p.samples]
        assert len(set(used)) == 4
        unused |= {f"{i:03d}" for i in range(5)} - set(used)
    assert len(unused) > 1


def test_backend_smaller_than_a_batch_is_an_error():
    with pytest.raises(
        ConfigError, match=r"backend 'tiny' has 3 samples.*fewer than one batch of 4"
    ):
        SliderSampler([backend("tiny", 3), backend("ok", 8)], 2, seed=0, world_size=2)


def test_epoch_end_and_next_epoch():
    sampler = SliderSampler([backend("p", 3, 1.0), backend("m", 3, -1.0), backend("n", 2)], 1, 7)
    first = epoch_plans(sampler, 0)
    assert len(first) == 8
    # Every image exactly once per epoch.
    assert sorted(s.path.as_posix() for p in first for s in p.samples) == sorted(
        f"/d/{b}/{i:03d}.png" for b, n in (("p", 3), ("m", 3), ("n", 2)) for i in range(n)
    )
    assert list(sampler) == []  # the epoch is over until set_epoch moves on
    second = epoch_plans(sampler, 1)
    assert [p.step for p in second] == list(range(8, 16))
    assert signs(second) == signs(first) == "+-0+-0+-"
    assert [p.files for p in second] != [p.files for p in first]  # reshuffled


def test_deterministic_and_independent_of_global_rng():
    def run(seed, disturb):
        sampler = SliderSampler(
            [backend("a", 8, 1.0), backend("b", 8, 1.0, probability=2.0), backend("m", 16, -1.0)],
            2,
            seed,
        )
        if disturb:
            torch.manual_seed(disturb)
            np.random.seed(disturb)
        return [(p.backend, p.files) for p in epoch_plans(sampler, 0)]

    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    reference = run(4, 0)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNG was not used
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert run(4, 123) == reference
    assert run(5, 0) != reference


def test_resume_mid_epoch_continues_the_exact_sequence():
    def make():
        return SliderSampler(
            [
                backend("a", 5, 0.5, repeats=1),
                backend("b", 3, 0.5, probability=3.0),
                backend("m", 13, -0.5),
                backend("n", 4),
            ],
            1,
            seed=9,
        )

    def run(sampler, epochs=3):
        out = []
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)
            out.extend(sampler)
        return out

    uninterrupted = run(make())

    first = make()
    first.set_epoch(0)
    done = []
    for plan in first:
        done.append(plan)
        if len(done) == 7:
            break
    saved = first.state_dict()
    assert saved["epoch"] == 0 and saved["index"] == 7

    resumed = make()
    resumed.load_state_dict(saved)
    assert done + run(resumed) == uninterrupted

    # A state taken for an earlier plan (prefetching loaders) resumes after that plan.
    again = make()
    again.load_state_dict(first.state_dict(after=done[3]))
    assert done[:4] + run(again) == uninterrupted

    # Resuming mid-epoch 1 as well.
    later = make()
    later.load_state_dict({**saved, "epoch": 1, "index": 2})
    assert run(later) == uninterrupted[len(make()) + 2 :]


def test_resume_refuses_a_changed_run():
    sampler = SliderSampler([backend("a", 4, 1.0), backend("m", 4, -1.0)], 1, seed=0)
    state = sampler.state_dict()
    with pytest.raises(ConfigError, match="batch_size 1 -> 2"):
        SliderSampler([backend("a", 4, 1.0), backend("m", 4, -1.0)], 2, seed=0).load_state_dict(
            state
        )
    # Another strength of the same sign keeps the sequence: resuming is allowed.
    SliderSampler([backend("a", 4, 0.7), backend("m", 4, -1.0)], 1, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="the dataset"):
        SliderSampler([backend("a", 5, 1.0), backend("m", 4, -1.0)], 1, seed=0).load_state_dict(
            state
        )


def test_two_ranks_same_signs_disjoint_files():
    backends = [
        backend("p1", 8, 0.5),
        backend("p2", 9, 1.0, probability=0.5),
        backend("m", 17, -0.5),
        backend("n", 6),
    ]
    ranks = [SliderSampler(backends, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    single = SliderSampler(backends, 4, seed=3)
    for epoch in (0, 1):
        plans = [epoch_plans(s, epoch) for s in ranks]
        assert len(plans[0]) == len(plans[1]) == len(single)
        for a, b, whole in zip(*plans, epoch_plans(single, epoch), strict=True):
            assert (a.step, a.backend, a.sign, a.slider_strength) == (
                b.step,
                b.backend,
                b.sign,
                b.slider_strength,
            )
            assert len(a.samples) == len(b.samples) == 2
            assert not set(a.files) & set(b.files)
            # The ranks split the global batch a single process of batch 4 would take.
            assert a.files + b.files == whole.files
        rank0 = {f for p in plans[0] for f in p.files}
        rank1 = {f for p in plans[1] for f in p.files}
        assert not rank0 & rank1  # no repeats: disjoint over the whole epoch


def test_preview_crosses_epochs_without_moving_the_sampler():
    sampler = SliderSampler([backend("p", 2, 1.0), backend("m", 2, -1.0)], 1, seed=0)
    plans = list(preview(sampler, 6))
    assert [p.step for p in plans] == list(range(6)) and [p.epoch for p in plans] == [0] * 4 + [
        1
    ] * 2
    assert sampler.state_dict()["index"] == 0
    assert [p.files for p in plans[:4]] == [p.files for p in epoch_plans(sampler, 0)]
