"""CompressionPolicy: one resolution of scale and ratio for every layer that takes them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from semidyn_rag.policy import CompressionPolicy
from semidyn_rag.precompress import PrecompressConfig
from semidyn_rag.store import policy_key


def test_override_replaces_given_values_and_keeps_the_rest():
    base = CompressionPolicy(scale=1.0)
    assert base.override() is base and base.override(scale=1.0) is base
    assert base.override(scale=2.0) == CompressionPolicy(scale=2.0)
    fixed = base.override(ratio=4)
    assert (fixed.scale, fixed.ratio, fixed.fixed) == (1.0, 4.0, True)
    assert fixed.override(scale=-1.0).ratio == 4.0  # a fixed ratio survives a new scale
    with pytest.raises(ValueError, match="frozen"):
        base.scale = 3.0  # type: ignore[misc]


def test_keys_are_canonical_and_ignore_the_scale_under_a_fixed_ratio():
    assert CompressionPolicy().key == "scale=0.0" == CompressionPolicy(scale=-0.0).key
    assert CompressionPolicy(ratio=4).key == CompressionPolicy(scale=3.0, ratio=4.0).key
    assert CompressionPolicy(scale=3.0, ratio=4.0).selector_scale is None
    assert (
        CompressionPolicy(scale=0.5).key == policy_key(0.5) == PrecompressConfig(scale=0.5).policy
    )
    assert PrecompressConfig(ratio=4).compression == CompressionPolicy(ratio=4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scale": math.nan}, "scale must be a finite number"),
        ({"scale": math.inf}, "scale must be a finite number"),
        ({"ratio": 0.5}, "ratio must be a finite number >= 1"),
        ({"ratio": math.inf}, "ratio must be a finite number >= 1"),
        ({"ratios": 4}, "Extra inputs"),
    ],
)
def test_unusable_values_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        CompressionPolicy(**fields)
    if "ratios" not in fields:
        with pytest.raises(ValueError, match=message):
            CompressionPolicy().override(**fields)
        with pytest.raises(ValueError, match=message):
            PrecompressConfig(**fields)


@given(st.floats(-8, 8), st.one_of(st.none(), st.floats(1, 64)), st.floats(-8, 8))
def test_a_narrower_override_always_wins(scale, ratio, call_scale):
    policy = CompressionPolicy(scale=scale, ratio=ratio).override(scale=call_scale)
    assert (policy.scale, policy.ratio) == (call_scale, ratio)
