"""The bit-equality comparator that most tests rely on: it must report what differs, not only pass."""

from __future__ import annotations

import pytest
import torch

from deep_ep.testing.compare import assert_bit_equal, bits, first_mismatch


def test_equal_tensors_pass() -> None:
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    assert first_mismatch(x, x.clone()) is None
    assert_bit_equal("x", x, x.clone())
    assert first_mismatch(torch.empty(0, 4), torch.empty(0, 4)) is None


def test_signed_zeros_differ() -> None:
    problem = first_mismatch(torch.tensor([1.0, -0.0]), torch.tensor([1.0, 0.0]))
    assert problem is not None and "1 of 2 elements differ" in problem and "first at [1]" in problem


def test_nan_equal_by_bits_and_payloads_differ() -> None:
    nan = torch.tensor([float("nan")])
    assert first_mismatch(nan, nan.clone()) is None
    other = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)  # a NaN with another payload
    assert torch.isnan(other).all()
    assert first_mismatch(other, nan) is not None


def test_first_difference_index_and_count() -> None:
    expected = torch.zeros(2, 3, 4, dtype=torch.float16)
    actual = expected.clone()
    actual[1, 2, 3] = 1.0
    actual[1, 0, 1] = 2.0
    problem = first_mismatch(actual, expected)
    assert problem == "2 of 24 elements differ; first at [1, 0, 1]: actual 2.0, expected 0.0"


def test_dtype_and_shape_mismatch() -> None:
    assert "dtype" in first_mismatch(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert "shape [2] != expected [3]" == first_mismatch(torch.zeros(2), torch.zeros(3))


def test_views_compare_by_logical_order() -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert first_mismatch(base.t(), base.t().contiguous()) is None
    assert first_mismatch(base.t(), base.reshape(3, 2)) is not None
    assert bits(torch.tensor(1.0)).tolist() == [0, 0, 128, 63]  # a 0-d tensor as its 4 little-endian bytes


def test_assert_bit_equal_names_the_field() -> None:
    with pytest.raises(AssertionError, match=r"^recv\[1\]: 1 of 2 elements differ"):
        assert_bit_equal("recv", (torch.zeros(2), torch.tensor([0.0, 1.0])), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(AssertionError, match=r"^counts: \[1, 2\] != expected \[1, 3\]"):
        assert_bit_equal("counts", [1, 2], [1, 3])
    with pytest.raises(AssertionError, match=r"^scales: NoneType vs expected Tensor"):
        assert_bit_equal("scales", None, torch.zeros(1))
    with pytest.raises(AssertionError, match=r"^pair: \(1,\) != expected \(1, 2\)"):
        assert_bit_equal("pair", (1,), (1, 2))  # tuples of different lengths are unequal, not zipped short
    assert_bit_equal("none", None, None)
