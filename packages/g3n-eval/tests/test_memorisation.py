import numpy as np
import pytest
from g3n_eval.memorisation import MemorisationConfig, audit, nearest_distances


def _data(seed=0, n=60, shape=(8, 4)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32)


def test_nearest_distances_exact():
    ref = np.array([[0.0, 0.0], [3.0, 4.0]])
    d, j = nearest_distances(np.array([[3.0, 4.0], [0.0, 1.0]]), ref)
    assert d.tolist() == [0.0, 1.0] and j.tolist() == [1, 0]


def test_copies_of_training_latents_fire():
    train, heldout = _data(0), _data(1, n=30)
    rng = np.random.default_rng(2)
    synthetic = train[rng.choice(len(train), 20, replace=False)] + 1e-7  # near-exact copies
    r = audit(synthetic, train, heldout)
    assert r.memorisation
    assert r.n_copies == 20 and r.fraction_below == 1.0 and r.ratio_of_means < 0.01
    assert any("copies" in s for s in r.reasons)


def test_independent_samples_pass():
    train, heldout, synthetic = _data(0), _data(1, n=30), _data(3, n=40)
    r = audit(synthetic, train, heldout)
    assert not r.memorisation, r.reasons
    assert 0.85 < r.ratio_of_means < 1.2
    assert r.n_copies == 0


def test_partial_copying_detected_by_fraction():
    train, heldout = _data(0), _data(1, n=30)
    synthetic = _data(3, n=40)
    synthetic[:10] = train[:10] * 0.999  # a quarter memorised, slightly shrunk (not exact)
    r = audit(synthetic, train, heldout, MemorisationConfig(copy_tol=0.0))
    assert r.memorisation and r.fraction_below >= 0.25


def test_shape_errors():
    with pytest.raises(ValueError, match="sizes differ"):
        audit(_data(0, shape=(4,)), _data(1, shape=(5,)), _data(2, shape=(5,)))
    with pytest.raises(ValueError, match="held-out"):
        audit(_data(0), _data(1), _data(2, n=1))
