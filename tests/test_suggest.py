"""Threshold suggestions against numpy, and their rationale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradclip.history import percentile
from gradclip.suggest import ThresholdCandidate, suggest_threshold

finite_norms = st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=200)


@given(finite_norms, st.floats(0.5, 100.0))
def test_percentile_matches_numpy_linear(norms: list[float], q: float) -> None:
    assert percentile(sorted(norms), q) == pytest.approx(np.percentile(norms, q), rel=1e-12)


@given(finite_norms)
def test_candidates_match_numpy(norms: list[float]) -> None:
    out = suggest_threshold(
        norms, percentiles=(10, 50), mean_multiples=(1.0, 2.0), clip_fractions=(0.05, 0.5)
    )
    assert [c.method for c in out] == ["autoclip"] * 2 + ["pascanu"] * 2 + ["clip_fraction"] * 2
    expected = [
        np.percentile(norms, 10),
        np.percentile(norms, 50),
        np.mean(norms),
        2 * np.mean(norms),
        np.percentile(norms, 95),
        np.percentile(norms, 50),
    ]
    a = np.asarray(norms)
    for c, e in zip(out, expected):
        assert c.threshold == pytest.approx(e, rel=1e-9, abs=1e-12)
        assert c.clip_fraction == np.mean(a > c.threshold)  # what it would have clipped


def test_clip_fraction_clips_that_fraction_on_distinct_values() -> None:
    norms = torch.randn(1000).exp()  # a tensor works too
    for f in (0.01, 0.05, 0.2):
        (c,) = suggest_threshold(norms, percentiles=(), mean_multiples=(), clip_fractions=(f,))
        assert c.clip_fraction == pytest.approx(f)
        assert c.parameter == f


def test_nonfinite_norms_are_left_out_and_mentioned() -> None:
    norms = [1.0, 2.0, math.nan, 3.0, math.inf, 4.0]
    out = suggest_threshold(norms)
    assert [c.threshold for c in out] == pytest.approx(
        [np.percentile([1, 2, 3, 4], 10), 2.5, np.percentile([1, 2, 3, 4], 95)]
    )
    assert all("2 non-finite norms left out" in c.rationale for c in out)


def test_rationale_cites_the_papers() -> None:
    autoclip, pascanu, fraction = suggest_threshold([1.0, 2.0, 3.0])
    assert "2007.14469" in autoclip.rationale and "p = 10" in autoclip.rationale
    assert "1211.5063" in pascanu.rationale and "average norm" in pascanu.rationale
    assert "5.0%" in fraction.rationale
    assert isinstance(autoclip, ThresholdCandidate)
    text = str(pascanu)
    assert text.startswith("2 ") and "clips 33.3% of steps" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norms": []}, r"no finite gradient norms to suggest a threshold from \(0 values"),
        ({"norms": [math.nan]}, r"no finite gradient norms .*\(1 values"),
        ({"percentiles": (0,)}, r"percentiles must be in \(0, 100\]; got 0"),
        ({"percentiles": (101,)}, r"percentiles must be in \(0, 100\]; got 101"),
        ({"mean_multiples": (-1,)}, "mean_multiples must be finite numbers > 0; got -1"),
        ({"clip_fractions": (1.0,)}, r"clip_fractions must be in \(0, 1\); got 1.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    norms = kwargs.pop("norms", [1.0, 2.0])
    with pytest.raises(ValueError, match=message):
        suggest_threshold(norms, **kwargs)


@pytest.mark.parametrize(
    ("norms", "message"),
    [
        ("abc", r"norms must be a sequence of numbers or a tensor .*; got str 'abc'"),
        (b"12", r"norms must be a sequence of numbers or a tensor .*; got bytes b'12'"),
        (42, r"norms must be a sequence of numbers or a tensor .*; got int 42"),
        ([1.0, "2.0"], r"norms must be numbers; norms\[1\] is str '2.0'"),
        ([1.0, 2.0, None], r"norms must be numbers; norms\[2\] is NoneType None"),
        ([True, 1.0], r"norms must be numbers; norms\[0\] is bool True"),
        ([torch.ones(2)], r"norms must be numbers; norms\[0\] is Tensor"),
    ],
)
def test_norms_that_are_not_numbers_are_a_type_error(norms: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        suggest_threshold(norms)  # type: ignore[arg-type]


def test_numpy_numbers_and_scalar_tensors_are_norms() -> None:
    values = [0.5, 1.5, 2.5, 4.0]
    mixed = [np.float32(0.5), torch.tensor(1.5), np.float64(2.5), np.int64(4)]
    for norms in (mixed, np.asarray(values), torch.tensor(values)):
        (c,) = suggest_threshold(norms, mean_multiples=(), clip_fractions=())  # type: ignore[arg-type]
        assert c.threshold == pytest.approx(np.percentile(values, 10), rel=1e-12)
