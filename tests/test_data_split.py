import pytest

from tracin_jax.data.split import first_cases, n_test_cases, split_cases
from tracin_jax.errors import InputError

IDS = [f"BraTS19_CASE_{i:03d}_1" for i in range(259)]


def test_paper_split_sizes():
    train, test = split_cases(IDS, 0.2, 1234)
    assert (len(train), len(test)) == (207, 52)
    assert not set(train) & set(test) and set(train) | set(test) == set(IDS)
    assert train == sorted(train) and test == sorted(test)


def test_split_is_deterministic_and_order_independent():
    a = split_cases(IDS, 0.2, 1234)
    b = split_cases(list(reversed(IDS)), 0.2, 1234)
    assert a == b
    assert split_cases(IDS, 0.2, 1) != a


def test_n_test_rounds_up_without_float_noise():
    assert n_test_cases(259, 0.2) == 52
    assert n_test_cases(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004
    assert n_test_cases(3, 0.3) == 1


def test_split_needs_one_case_each_side():
    assert split_cases(["a", "b"], 0.5, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    with pytest.raises(InputError, match="1 case"):
        split_cases(["a"], 0.2, 0)
    with pytest.raises(InputError, match="need at least 1 case on each side"):
        split_cases(["a", "b"], 0.9, 0)
    with pytest.raises(InputError, match="not unique"):
        split_cases(["a", "a", "b"], 0.5, 0)


def test_first_cases():
    assert first_cases(["c", "a", "b"], 2) == ["a", "b"]
    assert first_cases(["c", "a", "b"], 0) == ["a", "b", "c"]
