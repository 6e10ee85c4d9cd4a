import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from semidyn_rag import selector

ys = st.floats(min_value=-6, max_value=10, allow_nan=False)
scales = st.floats(min_value=-4, max_value=4, allow_nan=False)
modes = st.sampled_from(["round", "ceil", "floor"])
spaces = st.sampled_from(["linear", "log2"])
ratio_sets = st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32, 64]), min_size=1, unique=True)


@given(ys, scales, modes, spaces, ratio_sets)
def test_selected_ratio_is_always_a_candidate(y, scale, mode, space, ratios):
    assert selector.select_ratio(y, scale, ratios, mode, space) in ratios


@given(ys, scales, scales, modes, spaces)
def test_ratio_is_monotone_in_scale(y, s1, s2, mode, space):
    lo, hi = sorted((s1, s2))
    assert selector.select_ratio(y, lo, mode=mode, space=space) <= selector.select_ratio(
        y, hi, mode=mode, space=space
    )


@given(ys, scales, st.integers(1, 4000), modes, spaces)
def test_length_is_a_candidate_and_antitone_in_scale(y, scale, n, mode, space):
    m = selector.select_length(y, n, scale, mode=mode, space=space)
    assert m in selector.DEFAULT_LENGTHS
    assert selector.select_length(y, n, scale + 1, mode=mode, space=space) <= m


def test_equations_by_hand():
    assert selector.continuous_ratio(2.0, 1.0) == 8.0  # Eq. 1-2
    # Eq. 3 compares linearly: 5.9 is nearer 4 than 8, 6.1 nearer 8
    assert selector.select_ratio(math.log2(5.9)) == 4
    assert selector.select_ratio(math.log2(6.1)) == 8
    # in log2 space the boundary is the geometric midpoint sqrt(32) ~ 5.66
    assert selector.select_ratio(math.log2(5.9), space="log2") == 8
    assert selector.select_ratio(math.log2(5.0), mode="ceil") == 8
    assert selector.select_ratio(math.log2(5.0), mode="floor") == 4
    assert selector.select_ratio(10.0) == 32 and selector.select_ratio(-5.0) == 2  # clamped
    # Eq. 4-5: 1000 tokens at ratio 16 -> 62.5 latents -> 64
    assert selector.select_length(4.0, 1000) == 64


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not in the candidate set"):
        selector.check_ratio(3, [2, 4, 8])
    with pytest.raises(ValueError, match="empty"):
        selector.quantize(2.0, [])
    with pytest.raises(ValueError, match="non-finite"):
        selector.quantize(float("nan"), [2, 4])
    with pytest.raises(ValueError, match="quantize mode"):
        selector.quantize(2.0, [2, 4], mode="nearest")  # type: ignore[arg-type]
