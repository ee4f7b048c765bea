"""Auxiliary selection of METHOD.md §5 (cbpo_orch.data.auxiliary)."""

import math

import numpy as np
import pytest

from cbpo_orch.data.auxiliary import STRATEGIES, AuxIndex, profile_centroid


def at(deg, scale=1.0):
    rad = math.radians(deg)
    return [scale * math.cos(rad), scale * math.sin(rad)]


# Target "t" owns the rows at 0° and 10° (centroid at 5°, so its own rows are the
# nearest of all); other users' rows are placed at known angles and lengths.
ANGLES = [("t", 0), ("a", 20), ("b", 90), ("t", 10), ("c", 180), ("a", 45), ("b", -30)]


@pytest.fixture
def hand_index():
    emb = np.array([at(deg, scale=1 + i) for i, (_, deg) in enumerate(ANGLES)], dtype=np.float32)
    owners = [owner for owner, _ in ANGLES]
    return AuxIndex(emb, owners, [f"item{i}" for i in range(len(ANGLES))])


def rows_at(*degrees):
    return [next(i for i, (o, d) in enumerate(ANGLES) if d == deg and o != "t") for deg in degrees]


def test_nearest_order_on_hand_placed_vectors(hand_index):
    # cosine distance from 5°: 20° (15°), −30° (35°), 45° (40°), 90° (85°), 180° (175°)
    assert hand_index.select("t", 3, "nearest") == rows_at(20, -30, 45)
    assert hand_index.select("t", 10, "nearest") == rows_at(20, -30, 45, 90, 180)


def test_farthest_order_on_hand_placed_vectors(hand_index):
    assert hand_index.select("t", 2, "farthest") == rows_at(180, 90)
    assert hand_index.select("t", 10, "farthest") == rows_at(180, 90, 45, -30, 20)


def test_explicit_centroid_overrides_the_profile_centroid(hand_index):
    assert hand_index.select("t", 2, "nearest", centroid=np.array(at(250), dtype=np.float32)) == rows_at(180, -30)


def test_exactly_n_rows_even_when_target_owns_the_nearest(hand_index):
    # The target's two rows are the two best matches; they are dropped, n rows remain.
    assert len(hand_index.select("t", 2, "nearest")) == 2
    assert len(hand_index.select("a", 4, "farthest")) == 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_never_returns_the_targets_rows(strategy):
    rng = np.random.default_rng(0)
    owners = [f"u{i % 5}" for i in range(200)]
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    target_rows = [i for i, o in enumerate(owners) if o == "u3"]
    index = AuxIndex(emb, owners, [str(i) for i in range(200)])
    for n in (1, 20, 160, 500):
        for seed in range(3):
            rows = index.select("u3", n, strategy, seed=seed)
            assert not set(rows) & set(target_rows)
            assert len(rows) == min(n, 160) == len(set(rows))


def test_random_is_deterministic_per_seed_without_duplicates():
    owners = ["t"] * 10 + [f"o{i % 7}" for i in range(90)]
    emb = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    index = AuxIndex(emb, owners, [str(i) for i in range(100)])
    first = index.select("t", 30, "random", seed=11)
    assert first == index.select("t", 30, "random", seed=11)
    assert first != index.select("t", 30, "random", seed=12)
    assert len(set(first)) == 30 and min(first) >= 10


def test_random_works_for_a_target_absent_from_the_index(hand_index):
    assert sorted(hand_index.select("newcomer", 100, "random")) == list(range(len(ANGLES)))


def test_nearest_needs_a_centroid_for_a_target_absent_from_the_index(hand_index):
    with pytest.raises(ValueError):
        hand_index.select("newcomer", 2, "nearest")
    assert hand_index.select("newcomer", 1, "nearest", centroid=np.array(at(0))) == [0]


def test_unknown_strategy_is_rejected(hand_index):
    with pytest.raises(ValueError):
        hand_index.select("t", 2, "closest")


def test_user_centroid_is_the_normalised_mean_direction(hand_index):
    np.testing.assert_allclose(hand_index.user_centroid("t"), at(5), atol=1e-6)
    np.testing.assert_allclose(profile_centroid(np.array([[3.0, 0.0], [0.0, 0.5]])), at(45), atol=1e-6)


def test_vectors_are_stored_normalised(hand_index):
    np.testing.assert_allclose(np.linalg.norm(hand_index.vectors(range(len(ANGLES))), axis=1), 1.0, atol=1e-6)


def test_save_load_round_trip(hand_index, tmp_path):
    hand_index.save(tmp_path / "idx")
    loaded = AuxIndex.load(tmp_path / "idx")
    assert len(loaded) == len(hand_index) and loaded.dim == 2
    assert loaded.owners == hand_index.owners
    assert loaded.item_ids == hand_index.item_ids
    np.testing.assert_array_equal(loaded.vectors(range(7)), hand_index.vectors(range(7)))
    for strategy in STRATEGIES:
        assert loaded.select("t", 4, strategy, seed=3) == hand_index.select("t", 4, strategy, seed=3)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        AuxIndex(np.zeros((3, 2), dtype=np.float32), ["a", "b"], ["1", "2", "3"])
