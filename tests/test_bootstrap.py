"""The paired bootstrap behind every CIDEr-change interval, against cases worked out by hand."""
import numpy as np
import pytest

from captioning.errors import UserError
from captioning.results.bootstrap import change_interval, paired_scores, relative_changes


def test_relative_changes_by_hand():
    row, ref = np.array([0.0, 2.0, 1.0]), np.array([1.0, 1.0, 2.0])
    samples = np.array([[0, 0, 0],    # row mean 0,   ref mean 1   -> -100%
                        [1, 1, 1],    # 2 / 1                      -> +100%
                        [0, 1, 2],    # 1 / (4/3)                  -> -25%
                        [2, 2, 1]])   # (4/3) / (5/3)              -> -20%
    np.testing.assert_allclose(relative_changes(row, ref, samples), [-100.0, 100.0, -25.0, -20.0])


def test_a_uniform_change_has_a_point_interval():
    ref = np.random.default_rng(1).uniform(0.1, 3.0, 50)
    low, high = change_interval(0.9 * ref, ref)
    assert low == pytest.approx(-10.0) and high == pytest.approx(-10.0)


def test_two_images_interval_by_hand():
    """Images with changes -100% and +100% of equal weight: resamples give -100, 0 or +100 with
    probabilities 1/4, 1/2, 1/4, so the 95% interval is the two extremes and the middle is 0."""
    row, ref = np.array([0.0, 2.0]), np.array([1.0, 1.0])
    low, high = change_interval(row, ref, n_resamples=4000)
    assert (low, high) == (-100.0, 100.0)
    assert change_interval(row, ref, n_resamples=4000, level=0.4) == (0.0, 0.0)


def test_pairing_narrows_the_interval():
    """Images differ a lot in difficulty; the models differ little. Pairing cancels the difficulty."""
    rng = np.random.default_rng(2)
    ref = rng.uniform(0.0, 3.0, 300)
    row = ref * rng.normal(0.97, 0.02, 300)
    low, high = change_interval(row, ref)
    assert -4.0 < low < -3.0 < high < -2.0  # the true change, -3%, inside a narrow interval
    assert high - low < 1.0
    # unpaired (shuffled) the same scores give an interval many times wider
    low_u, high_u = change_interval(rng.permutation(row), ref)
    assert high_u - low_u > 5 * (high - low)


def test_fixed_seed_gives_the_same_interval():
    rng = np.random.default_rng(3)
    ref, row = rng.uniform(0, 2, 40), rng.uniform(0, 2, 40)
    assert change_interval(row, ref) == change_interval(row, ref)
    assert change_interval(row, ref, seed=1) != change_interval(row, ref)


def test_scores_pair_by_image_id():
    row, ref = paired_scores({"2": 4.0, "1": 3.0}, {"1": 1.0, "2": 2.0})
    assert row.tolist() == [3.0, 4.0] and ref.tolist() == [1.0, 2.0]
    with pytest.raises(UserError, match="different test images"):
        paired_scores({"1": 1.0}, {"2": 1.0}, "a", "b")
