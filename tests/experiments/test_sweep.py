"""The vectorized sweep equals the same grid trained one run at a time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradclip.experiments.sweep import (
    SWEEP_COLUMNS,
    SweepPoint,
    grid_points,
    parse_grid,
    plot_sweep,
    split,
    sweep,
    sweep_sequential,
    sweep_vectorized,
    write_sweep,
)
from gradclip.experiments.tasks import TaskOptions

OPTIONS = TaskOptions(max_steps=50)


def test_vectorized_equals_sequential_to_fp32_tolerance() -> None:
    points = grid_points([1e-3, 0.05, 0.5, 3.0], [0.1, 2.0, math.inf])
    fast = sweep_vectorized(points, options=OPTIONS)
    slow = sweep_sequential(points, options=OPTIONS)
    assert any(p.diverged for p in slow) and not all(p.diverged for p in slow)
    for a, b in zip(fast, slow):
        assert (a.lr, a.threshold, a.diverged, a.clip_rate) == (
            b.lr,
            b.threshold,
            b.diverged,
            b.clip_rate,
        )
        if not a.diverged:
            assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)
            assert a.clean_mse == pytest.approx(b.clean_mse, rel=1e-3, abs=1e-6)
            assert a.weight_error == pytest.approx(b.weight_error, rel=1e-3, abs=1e-6)


def test_clipping_lets_a_large_learning_rate_train() -> None:
    points = {(p.lr, p.threshold): p for p in sweep([3.0], [0.1], options=OPTIONS)}
    assert points[(3.0, math.inf)].diverged
    assert not points[(3.0, 0.1)].diverged


def test_split_covers_the_grid_once() -> None:
    points = grid_points([1, 2, 3], [4, 5])
    shares = [split(points, r, 4) for r in range(4)]
    assert sorted(p for s in shares for p in s) == sorted(points)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-4:1:5", [1e-4, 1e-3, 1e-2, 0.1, 1.0]), ("0.5", [0.5]), ("2:2:1", [2.0])],
)
def test_parse_grid(text: str, expected: list[float]) -> None:
    assert parse_grid(text, "--lr") == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "a:b:c", "1:10", "0:1:3", "1:10:0", "-1,2", "x"])
def test_parse_grid_errors_name_the_option(text: str) -> None:
    with pytest.raises(ValueError, match="--threshold"):
        parse_grid(text, "--threshold")


def test_outputs(tmp_path: Path) -> None:
    points = sweep([0.01, 3.0], [0.5], options=TaskOptions(max_steps=20))
    csv_text = write_sweep(points, tmp_path / "s.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(SWEEP_COLUMNS) and len(csv_text) == 1 + 4
    png = plot_sweep(points, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_heatmap_text_is_dark_on_light_cells_and_light_on_dark_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """viridis_r: the lowest error is a light yellow cell, the highest a dark purple one."""
    from matplotlib.figure import Figure

    kept: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: kept.append(self))
    points = [
        SweepPoint(lr=0.1, threshold=t, final_loss=v, clean_mse=v, weight_error=1.0,
                   clip_rate=0.5, diverged=False)
        for t, v in ((0.1, 0.01), (1.0, 1.0), (math.inf, 100.0))
    ] + [
        SweepPoint(lr=1.0, threshold=0.1, final_loss=math.nan, clean_mse=math.nan,
                   weight_error=math.nan, clip_rate=1.0, diverged=True)
    ]  # fmt: skip
    plot_sweep(points, tmp_path / "s.png")
    colours = {t.get_text(): t.get_color() for t in kept[0].axes[0].texts}
    assert colours["0.01"] == "black"  # light yellow cell
    assert colours["1e+02"] == "white"  # dark purple cell
    assert colours["×"] == "black"  # a diverged cell is blank
