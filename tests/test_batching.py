import pytest

from lightning_hrp.engine.batching import group_by_key, map_grouped


def test_groups_keep_first_seen_order():
    assert group_by_key(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]


def test_each_group_is_handed_over_once_and_results_come_back_in_input_order():
    calls = []

    def batched(indices, group):
        calls.append(list(indices))
        return [f"{item}@{len(group)}" for item in group]

    items = ["x0", "y1", "x2", "z3", "y4"]
    assert map_grouped(items, [item[0] for item in items], batched) == ["x0@2", "y1@2", "x2@2", "z3@1", "y4@2"]
    assert calls == [[0, 2], [1, 4], [3]]


@pytest.mark.parametrize(("keys", "batched"), [([1], lambda i, g: g), ([1, 1], lambda i, g: g[:1])])
def test_mismatched_counts_are_refused(keys, batched):
    with pytest.raises(ValueError):
        map_grouped(["a", "b"], keys, batched)
