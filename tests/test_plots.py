"""Plots are valid PNGs of the expected pixel size; errors are clear."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

from gradclip.plots import plot_histogram, plot_layers, plot_norms, plot_report
from gradclip.suggest import suggest_threshold
from gradclip.writers import LogData, read_log

pytest.importorskip("matplotlib")  # a fallback only: the dev extra installs it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return width, height


def check_png(path: Path, size: tuple[int, int]) -> None:
    assert png_size(path) == size
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        return
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size


def synthetic_log(tmp_path: Path, steps: int = 120, layers: int = 3) -> LogData:
    """A CSV log like the monitor writes: clipped steps, a spike, a non-finite step."""
    header = ["step", "total_norm", "threshold", "clipped", "nonfinite", "norm_score",
              "norm_spike"] + [f"module/l{i}" for i in range(layers)]  # fmt: skip
    lines = [",".join(header)]
    for s in range(1, steps + 1):
        norm = 1.0 + 0.5 * math.sin(s / 5) + (20.0 if s == 60 else 0.0)
        bad = s == 90
        total = "nan" if bad else repr(norm)
        layer_values = ["nan" if i == 1 and s < 10 else repr(norm / (i + 1)) for i in range(layers)]
        row = [str(s), total, "1.2", str(int(norm > 1.2)), str(int(bad)),
               "8.0" if s == 60 else "nan", str(int(s == 60)), *layer_values]  # fmt: skip
        lines.append(",".join(row))
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    return read_log(path)


def test_norms_plot(tmp_path: Path) -> None:
    log = synthetic_log(tmp_path)
    out = plot_norms(log, tmp_path / "out" / "norms.png")
    check_png(out, (1000, 400))
    out = plot_norms(log, tmp_path / "small.png", size=(4, 3), dpi=50)
    check_png(out, (200, 150))


def test_norms_legend_does_not_hide_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Norms that rise all run long fill the upper right corner; the legend goes elsewhere."""
    lines = ["step,total_norm,threshold,clipped"]
    for s in range(1, 201):
        norm = 0.05 * s
        lines.append(f"{s},{norm!r},5.0,{int(norm > 5.0)}")
    path = tmp_path / "rising.csv"
    path.write_text("\n".join(lines) + "\n")
    figures = []
    import gradclip.plots

    real_save = gradclip.plots._save
    monkeypatch.setattr(
        gradclip.plots,
        "_save",
        lambda fig, out, dpi: figures.append(fig) or real_save(fig, out, dpi),
    )
    plot_norms(read_log(path), tmp_path / "rising.png")
    (fig,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # lay it out again, as savefig did
    canvas.draw()
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend()
    box = legend.get_window_extent(renderer)
    points = ax.transData.transform([(s, 0.05 * s) for s in range(1, 201)])
    inside = [p for p in points if box.contains(*p)]
    assert not inside, f"{len(inside)} data points under the legend at {box}"


def test_layers_heatmap_including_binning_of_long_runs(tmp_path: Path) -> None:
    log = synthetic_log(tmp_path, steps=2500, layers=60)
    check_png(plot_layers(log, tmp_path / "layers.png", max_columns=500), (1000, 600))


def test_layers_without_per_layer_columns_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "scalars.csv"
    path.write_text("step,total_norm\n1,1.0\n2,2.0\n")
    with pytest.raises(ValueError, match=r"no per-layer columns .*per_layer=True"):
        plot_layers(read_log(path), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_histogram_with_candidates(tmp_path: Path) -> None:
    norms = [math.exp(0.1 * i) for i in range(100)] + [math.nan]
    candidates = [*suggest_threshold(norms), 3.0]
    out = plot_histogram(norms, tmp_path / "hist.png", candidates=candidates)
    check_png(out, (800, 450))
    with pytest.raises(ValueError, match="no finite gradient norms"):
        plot_histogram([math.inf], tmp_path / "none.png")


def test_report_writes_all_three(tmp_path: Path) -> None:
    paths = plot_report(synthetic_log(tmp_path), tmp_path / "report")
    assert [p.name for p in paths] == ["norms.png", "layers.png", "histogram.png"]
    for p in paths:
        png_size(p)


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = synthetic_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'gradclip\[plot\]'"):
        plot_norms(log, tmp_path / "n.png")


def test_importing_gradclip_plots_does_not_import_matplotlib() -> None:
    import subprocess

    code = "import gradclip.plots, gradclip.monitor, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
