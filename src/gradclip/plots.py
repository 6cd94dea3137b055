"""PNG plots of a monitored run: norms over time, per-layer heatmap, norm histogram.

matplotlib is imported only when a plot is made, and only its object-oriented API
(``matplotlib.figure.Figure`` rendered by the Agg canvas): no ``pyplot``, no global
backend switch, so plotting from a training script or a notebook changes nothing
else. Every figure has a fixed pixel size, ``size`` inches times ``dpi``.

Install matplotlib with the ``gradclip[plot]`` extra.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradclip.suggest import ThresholdCandidate
from gradclip.writers import LogData

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_histogram", "plot_layers", "plot_norms", "plot_report"]

Size = tuple[float, float]
PathLike = str | os.PathLike[str]


def _figure(size: Size, dpi: int) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "gradclip's plots need matplotlib: pip install 'gradclip[plot]'"
        ) from error
    return Figure(figsize=size, dpi=dpi, layout="constrained")


def _save(fig: Figure, path: PathLike, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def plot_norms(log: LogData, path: PathLike, *, size: Size = (10.0, 4.0), dpi: int = 100) -> Path:
    """The pre-clip total norm over time, the threshold, and the clipped steps marked.

    Spikes are marked with crosses and steps with a non-finite norm with red
    vertical lines. The y-axis is logarithmic when the norms span over two decades.

    Args:
        log: a log read with :func:`gradclip.writers.read_log`.
        path: the PNG to write.
        size: inches (width, height); the image is ``size * dpi`` pixels.
        dpi: pixels per inch.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ImportError: matplotlib is missing (install ``gradclip[plot]``).
    """
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    steps = log.steps
    norms = log.values["total_norm"]
    ax.plot(steps, norms, lw=0.8, color="tab:blue", label="total norm (pre-clip)")
    threshold = log.column("threshold")
    if any(math.isfinite(t) for t in threshold):
        ax.plot(steps, threshold, lw=1.2, color="black", ls="--", label="threshold")
    clipped = [(s, v) for s, v, c in zip(steps, norms, log.column("clipped", 0.0)) if c == 1]
    if clipped:
        xs, ys = zip(*clipped)
        ax.scatter(xs, ys, s=10, color="tab:orange", zorder=3, label=f"clipped ({len(xs)})")
    spikes = [e for e in log.spikes() if e.metric == "total_norm"]
    if spikes:
        ax.scatter(
            [e.step for e in spikes],
            [e.value for e in spikes],
            s=60,
            marker="x",
            color="tab:red",
            zorder=4,
            label=f"spikes ({len(spikes)})",
        )
    bad = [s for s, v in zip(steps, norms) if not math.isfinite(v)]
    for i, s in enumerate(bad[:200]):
        ax.axvline(s, color="red", alpha=0.4, lw=0.8, label="non-finite" if i == 0 else None)
    finite = [v for v in norms if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm over training")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")  # where it hides the fewest points
    return _save(fig, path, dpi)


def plot_layers(
    log: LogData,
    path: PathLike,
    *,
    size: Size = (10.0, 6.0),
    dpi: int = 100,
    max_columns: int = 1000,
) -> Path:
    """Per-layer gradient norms over time as a heatmap (log10 colour scale).

    One row per module column of the log (per parameter if there are none), one
    column per step; with more than ``max_columns`` steps, consecutive steps are
    averaged (in log space) into ``max_columns`` bins. White: no gradient.

    Raises:
        ValueError: the log has no per-layer columns (logged with ``per_layer=False``).
        ImportError: matplotlib is missing (install ``gradclip[plot]``).
    """
    import numpy as np

    names = log.layer_columns()
    if not names:
        raise ValueError(
            f"{log.path} has no per-layer columns (param/... or module/...); "
            "log with GradMonitor(per_layer=True)"
        )
    fig = _figure(size, dpi)
    data = np.array([log.values[n] for n in names], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        data = np.where(np.isfinite(data) & (data > 0), np.log10(data), np.nan)
    steps = np.array(log.steps)
    if data.shape[1] > max_columns:
        edges = np.linspace(0, data.shape[1], max_columns + 1).astype(int)
        with warnings.catch_warnings():  # all-NaN bins ("mean of empty slice") stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            data = np.stack(
                [np.nanmean(data[:, a:b], axis=1) for a, b in itertools.pairwise(edges)], 1
            )
        steps = steps[edges[:-1]]
    ax = fig.add_subplot()
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(names) - 0.5, -0.5)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", extent=extent, cmap="viridis")
    fig.colorbar(image, ax=ax, label="log10 gradient norm")
    labels = [n.split("/", 1)[1] for n in names]
    if len(labels) <= 40:
        ax.set_yticks(range(len(labels)), labels, fontsize="x-small")
    else:
        ticks = list(range(0, len(labels), math.ceil(len(labels) / 40)))
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize="x-small")
    ax.set_xlabel("step")
    kind = "module" if names[0].startswith("module/") else "parameter"
    ax.set_title(f"Gradient norm per {kind}")
    return _save(fig, path, dpi)


def plot_histogram(
    norms: Sequence[float],
    path: PathLike,
    *,
    candidates: Sequence[ThresholdCandidate | float] = (),
    size: Size = (8.0, 4.5),
    dpi: int = 100,
    bins: int = 50,
) -> Path:
    """Histogram of the finite total norms, with candidate thresholds as vertical lines.

    Bins are logarithmic when the norms span over two decades.

    Args:
        norms: the total norms (non-finite ones are left out).
        path: the PNG to write.
        candidates: thresholds to draw (from :func:`gradclip.suggest_threshold`, or
            plain numbers).
        size: inches (width, height).
        dpi: pixels per inch.
        bins: number of bins.

    Raises:
        ValueError: no finite norm.
        ImportError: matplotlib is missing (install ``gradclip[plot]``).
    """
    import numpy as np

    values = np.array([v for v in norms if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        raise ValueError("no finite gradient norms to plot")
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    positive = values[values > 0]
    log_bins = positive.size == values.size and positive.max() / positive.min() > 100
    edges: Any = bins
    if log_bins:
        edges = np.geomspace(positive.min(), positive.max(), bins + 1)
        ax.set_xscale("log")
    ax.hist(values, bins=edges, color="tab:blue", alpha=0.75)
    colors = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    for i, c in enumerate(candidates):
        if isinstance(c, ThresholdCandidate):
            value, label = c.threshold, f"{c.method} {c.parameter:g}: {c.threshold:.3g}"
        else:
            value, label = float(c), f"{float(c):.3g}"
        ax.axvline(value, color=colors[i % len(colors)], lw=1.5, ls="--", label=label)
    if candidates:
        ax.legend(fontsize="small")
    ax.set_xlabel("total gradient norm (pre-clip)")
    ax.set_ylabel("steps")
    ax.set_title(f"Gradient norm histogram ({values.size} steps)")
    return _save(fig, path, dpi)


def plot_report(log: LogData, out_dir: PathLike) -> list[Path]:
    """Write the report's PNGs into ``out_dir`` and return their paths.

    ``norms.png`` (:func:`plot_norms`), ``layers.png`` (:func:`plot_layers`, if the
    log has per-layer columns) and ``histogram.png`` (:func:`plot_histogram`).
    """
    out = Path(out_dir)
    paths = [plot_norms(log, out / "norms.png")]
    if log.layer_columns():
        paths.append(plot_layers(log, out / "layers.png"))
    finite = [v for v in log.values["total_norm"] if math.isfinite(v)]
    if finite:
        paths.append(plot_histogram(finite, out / "histogram.png"))
    return paths
