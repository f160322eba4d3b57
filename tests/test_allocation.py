"""The rank allocation rule (lightning_hrp.engine.allocation): a pure function, checked on hand-computed cases."""

import random

import pytest

from lightning_hrp.engine.allocation import allocate_ranks, direction_values


def test_energy_share_follows_how_each_layer_spreads_its_energy():
    # Shares: layer 0 (9, 4, 1)/14 = .643, .286, .071; layer 1 1/3 each. After rank 1 each, the two
    # remaining ranks go to the largest of .286, .071 | .333, .333: both to layer 1.
    assert allocate_ranks([[3, 2, 1], [1, 1, 1]], 4, max_ranks=[3, 3], rule="energy_share") == [1, 3]


def test_energy_follows_the_size_of_the_update():
    # Energies: layer 0 (9, 4, 1), layer 1 (1, 1, 1): after rank 1 each, 4 goes to layer 0, then a tie
    # of 1 between layer 0's third and layer 1's second direction goes to the earlier layer.
    assert allocate_ranks([[3, 2, 1], [1, 1, 1]], 4, max_ranks=[3, 3]) == [3, 1]  # the default rule


def test_direction_values_by_hand():
    assert direction_values([3, 4], "energy") == [9.0, 16.0]
    assert direction_values([3, 4], "energy_share") == pytest.approx([9 / 25, 16 / 25])
    assert direction_values([0.0, 0.0], "energy_share") == [0.0, 0.0]  # a layer that learned nothing


def test_ties_go_to_the_earlier_layer_then_the_earlier_direction():
    for rule in ("energy", "energy_share"):
        assert allocate_ranks([[1, 1], [1, 1], [1, 1]], 4, max_ranks=[2, 2, 2], rule=rule) == [2, 1, 1]
        assert allocate_ranks([[1, 1], [1, 1], [1, 1]], 5, max_ranks=[2, 2, 2], rule=rule) == [2, 2, 1]


def test_minimum_and_maximum_per_layer():
    # Layer 0 holds nearly all the value but can take at most 2; the rest spills to layer 1.
    assert allocate_ranks([[10, 9, 8, 7], [1, 0.1, 0.01, 0.001]], 5, max_ranks=[2, 4], rule="energy") == [2, 3]
    # A zero spectrum (nothing learned) only gets the minimum, here 2, under either rule.
    for rule in ("energy", "energy_share"):
        assert allocate_ranks([[0, 0, 0], [5, 4, 3]], 5, max_ranks=[3, 3], min_rank=2, rule=rule) == [2, 3]
    # The budget's extremes: everyone at the minimum, everyone at the maximum.
    assert allocate_ranks([[3, 2, 1], [1, 1, 1]], 2, max_ranks=[3, 2]) == [1, 1]
    assert allocate_ranks([[3, 2, 1], [1, 1, 1]], 5, max_ranks=[3, 2]) == [3, 2]


def test_a_shorter_spectrum_counts_as_zeros_beyond_its_end():
    assert allocate_ranks([[1.0], [1.0, 0.5]], 3, max_ranks=[2, 2], rule="energy") == [1, 2]


@pytest.mark.parametrize(("budget", "max_ranks"), [(1, [2, 2]), (5, [2, 2]), (3, [2, 0])])
def test_a_budget_that_cannot_be_placed_is_refused(budget, max_ranks):
    with pytest.raises(ValueError, match="budget|min_rank"):
        allocate_ranks([[1, 1], [1, 1]], budget, max_ranks=max_ranks)


def test_every_layer_gets_its_leading_directions_and_the_budget_is_spent_exactly():
    # Greedy over values that never increase within a layer: the set handed out is the global top of
    # the values beyond the minimum, and each layer's ranks are its leading directions.
    generator = random.Random(0)
    for _ in range(50):
        layers = generator.randint(1, 6)
        spectra = [sorted((generator.random() for _ in range(8)), reverse=True) for _ in range(layers)]
        budget = generator.randint(layers, 8 * layers)
        for rule in ("energy", "energy_share"):
            ranks = allocate_ranks(spectra, budget, max_ranks=[8] * layers, rule=rule)
            assert sum(ranks) == budget and all(1 <= r <= 8 for r in ranks)
            given = [v for s, r in zip(spectra, ranks) for v in direction_values(s, rule)[1:r]]
            left = [v for s, r in zip(spectra, ranks) for v in direction_values(s, rule)[r:]]
            assert not given or not left or min(given) >= max(left)
