import numpy as np
import pytest

from edgeqat.config import DataConfig
from edgeqat.data import load_dataset
from edgeqat.errors import UserError


def test_digits_splits_are_disjoint_and_shaped():
    d = load_dataset(DataConfig(name="digits", calibration_samples=100), seed=0)
    assert d.input_shape == (8, 8, 1)
    assert d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert len(d.x_calib) == 100
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    # calibration samples come from the training split, never from test
    train = {x.tobytes() for x in d.x_train}
    assert all(x.tobytes() in train for x in d.x_calib)


def test_digits_is_deterministic_per_seed():
    a = load_dataset(DataConfig(name="digits"), seed=3)
    b = load_dataset(DataConfig(name="digits"), seed=3)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_mnist1d_is_generated_locally():
    d = load_dataset(DataConfig(name="mnist1d", eval_samples=200), seed=0)
    assert d.input_shape == (40, 1)
    assert len(d.x_test) == 200
    assert len(d.x_train) + len(d.x_val) == 4000


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((50, 6)), y_train=rng.integers(0, 3, 50),
             x_test=rng.random((20, 6)), y_test=rng.integers(0, 3, 20))
    d = load_dataset(DataConfig(name="npz", path=str(path), calibration_samples=10))
    assert d.input_shape == (6,)
    assert d.x_train.dtype == np.float32
    assert len(d.x_test) == 20


def test_npz_missing_key_names_it(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((2, 2)))
    with pytest.raises(UserError, match="missing array.*y_train, x_test, y_test"):
        load_dataset(DataConfig(name="npz", path=str(path)))


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("hello")
    with pytest.raises(UserError, match="d.npz: not a .npz file"):
        load_dataset(DataConfig(name="npz", path=str(path)))
