"""Device-vs-host output comparison in quantization steps."""

import numpy as np
import pytest

from edgeqat.harness.compare import compare_outputs


def test_identical_raw_outputs():
    a = np.array([[1, 5, -3], [0, 0, 9]], np.int8)
    cmp = compare_outputs(a, a.copy())
    assert cmp.identical and cmp.top1_agreement == 1.0 and cmp.samples == 2


def test_raw_differences_are_steps():
    host = np.array([[10, 20, 30], [5, 4, 3]], np.int8)
    dev = np.array([[10, 22, 30], [5, 4, 127]], np.int8)
    cmp = compare_outputs(host, dev)
    assert cmp.max_abs_steps == 124
    assert cmp.mean_abs_steps == pytest.approx((2 + 124) / 6)
    assert cmp.mismatched_fraction == pytest.approx(2 / 6)
    assert cmp.top1_agreement == 0.5
    assert cmp.to_dict()["identical"] is False


def test_dequantized_outputs_need_the_scale():
    host = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    dev = host + np.float32(0.125)
    with pytest.raises(ValueError, match="scale"):
        compare_outputs(host, dev)
    cmp = compare_outputs(host, dev, scale=0.125)
    assert cmp.max_abs_steps == pytest.approx(1.0) and cmp.top1_agreement == 1.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(np.zeros((2, 3), np.int8), np.zeros((3, 3), np.int8))
