"""Mixture sampler: composition statistics, exact counts, changes between steps, checkpointable state."""

import numpy as np
import pytest

from aioli_repro.data.sampler import MixtureSampler, ProportionError, largest_remainder, validate_proportions


def test_multinomial_composition_within_statistical_bounds():
    p = np.array([0.2, 0.5, 0.3])
    s = MixtureSampler([50, 400, 120], batch_size=8, seed=3)
    s.set_proportions(p)
    steps = 4000
    counts = np.zeros(3)
    for _ in range(steps):
        g, idx = s.next_batch()
        counts += np.bincount(g, minlength=3)
    n = steps * 8
    # each group count is Binomial(n, p_i): allow 4.5 standard deviations
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4.5 * sd), (counts / n, p)
    # per-batch composition really varies (i.i.d. draws, not fixed counts)
    comps = {tuple(np.bincount(s.next_batch()[0], minlength=3)) for _ in range(50)}
    assert len(comps) > 3


@pytest.mark.parametrize("m", [2, 3, 7])
def test_exact_composition_tracks_target_within_one_sequence(m):
    rng = np.random.default_rng(m)
    s = MixtureSampler([97] * m, batch_size=8, seed=0, composition="exact")
    # Aioli-style smoothed one-hot probes, e.g. one_hot_factor 0.75 at m = 7 (p*B not integral)
    for target in range(m):
        p = np.full(m, 0.25 / (m - 1))
        p[target] = 0.75
        s.set_proportions(p, "exact")
        got = np.zeros(m)
        for step in range(1, 31):
            g, _ = s.next_batch()
            assert len(g) == 8
            got += np.bincount(g, minlength=m)
            assert np.all(np.abs(got - p * 8 * step) < 1.0 + 1e-9), (step, got, p * 8 * step)
    # integral case: every batch is exactly p·B
    p = rng.dirichlet(np.ones(m))
    p = largest_remainder(p * 8, 8) / 8
    s.set_proportions(p, "exact")
    for _ in range(20):
        assert np.array_equal(np.bincount(s.next_batch()[0], minlength=m), (p * 8).astype(int))


def test_largest_remainder_exact():

    c = largest_remainder(np.array([2.5, 2.5, 3.0]), 8)
    assert c.sum() == 8 and c.tolist() == [3, 2, 3]
    c = largest_remainder(np.array([0.4, 0.3, 0.3]) * 10, 10)
    assert c.tolist() == [4, 3, 3]


def test_proportion_change_takes_effect_next_batch():
    s = MixtureSampler([30, 30], batch_size=8, seed=1)
    s.set_proportions([1.0, 0.0])
    assert set(s.next_batch()[0].tolist()) == {0}
    s.set_proportions([0.0, 1.0])
    assert set(s.next_batch()[0].tolist()) == {1}


def test_every_sequence_visited_once_per_pass():
    s = MixtureSampler([13, 5], batch_size=6, seed=2)
    s.set_proportions([1.0, 0.0])
    seen = np.concatenate([s.next_batch()[1] for _ in range(13)])  # 78 = 6 passes over 13
    assert np.bincount(seen, minlength=13).tolist() == [6] * 13


def test_state_roundtrip_reproduces_stream():
    a = MixtureSampler([40, 17, 9], batch_size=8, seed=5, composition="exact")
    a.set_proportions([0.5, 0.3, 0.2])
    for _ in range(11):
        a.next_batch()
    state = a.state_dict()
    b = MixtureSampler([40, 17, 9], batch_size=8, seed=5)
    b.load_state_dict(state)
    for _ in range(25):
        ga, ia = a.next_batch()
        gb, ib = b.next_batch()
        assert np.array_equal(ga, gb) and np.array_equal(ia, ib)
    with pytest.raises(ValueError, match="group sizes"):
        MixtureSampler([40, 17, 8], batch_size=8, seed=5).load_state_dict(state)


def test_seeds_differ():
    a = MixtureSampler([100, 100], batch_size=8, seed=0)
    b = MixtureSampler([100, 100], batch_size=8, seed=1)
    assert any(not np.array_equal(a.next_batch()[1], b.next_batch()[1]) for _ in range(5))


@pytest.mark.parametrize(
    "p,msg",
    [
        ([0.5, 0.6], "sum to 1"),
        ([-0.1, 1.1], ">= 0"),
        ([float("nan"), 1.0], "finite"),
        ([1.0], "expected 2 values"),
        ("ab", "not a list of numbers"),
    ],
)
def test_bad_proportions_name_the_field(p, msg):
    with pytest.raises(ProportionError, match=msg):
        validate_proportions(p, 2, field="method.mixer.proportions")
    with pytest.raises(ProportionError, match="method.mixer.proportions"):
        validate_proportions(p, 2, field="method.mixer.proportions")
