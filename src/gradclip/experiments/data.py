"""Data for the experiments: generated, shipped inside packages, or pointed to by the user.

Nothing is downloaded. Defaults: noisy sine waves (generated), the 8×8 digits that
ship with scikit-learn, English text that ships with Python (``pydoc_data``), and a
generated regression problem with heavy-tailed noise. ``load_images`` reads real
MNIST from its IDX files (gzipped or not) or an ``.npz`` with the usual arrays.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


def noisy_sine(
    n: int, seq_len: int, generator: torch.Generator, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """``n`` noisy sine sequences of random phase and frequency, as inputs and next values.

    Returns:
        ``(x, y)`` of shape ``(n, seq_len, 1)`` each; ``y`` is ``x`` shifted by one step.
    """
    t = torch.arange(seq_len + 1, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    freq = 0.05 + 0.15 * torch.rand(n, 1, generator=generator)
    wave = torch.sin(freq * t + phase)
    wave = wave + noise * torch.randn(wave.shape, generator=generator)
    return wave[:, :-1, None], wave[:, 1:, None]


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, no download), scaled to [0, 1].

    Raises:
        DataError: scikit-learn is not installed (the ``experiments`` extra).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as error:
        raise DataError(
            "the digits data ship with scikit-learn: pip install 'gradclip[experiments]'"
        ) from error
    digits = sk_load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def load_images(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images and labels from MNIST IDX files or an ``.npz``, flattened and scaled to [0, 1].

    Args:
        path: an ``.npz`` with ``x_train``/``y_train`` (Keras' layout) or ``x``/``y``
            (or ``images``/``labels``); or the IDX images file (``*-images-idx3-ubyte``,
            optionally ``.gz``), whose labels file is found beside it by name
            (``images`` → ``labels``, ``idx3`` → ``idx1``); or a directory holding
            ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``
            (or the dot-separated ``train-images.idx3-ubyte`` of some mirrors).

    Returns:
        ``(x, y)``: float32 ``(n, pixels)`` in [0, 1] and int64 labels ``(n,)``.

    Raises:
        DataError: the path is missing, or the file is not a usable image set.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if path.is_dir():
        path = _find(path, ("train-images-idx3-ubyte", "train-images.idx3-ubyte"))
    if path.suffix == ".npz":
        x, y = _load_npz(path)
    else:
        x = _read_idx(path)
        labels_name = path.name.replace("images", "labels").replace("idx3", "idx1")
        labels = path.with_name(labels_name)
        if labels == path or not labels.exists():
            raise DataError(f"--data {path}: no labels file {labels_name} beside it")
        y = _read_idx(labels)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"--data {path}: expected images (n, ...) and labels (n,); got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    images = torch.as_tensor(x.reshape(len(x), -1), dtype=torch.float32)
    scale = float(images.max()) if images.numel() else 1.0
    return images / (scale if scale > 1.0 else 1.0), torch.as_tensor(y, dtype=torch.long)


def load_text(path: str | Path | None = None) -> str:
    """A text corpus: the file at ``path``, or Python's own ``pydoc_data`` topics (English).

    Raises:
        DataError: the file is missing, not UTF-8, or too short to train on.
    """
    if path is None:
        import pydoc_data.topics

        return "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--text {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise DataError(f"--text {path}: not a UTF-8 text file ({error})") from None
    if len(text) < 100:
        raise DataError(f"--text {path}: {len(text)} characters; need at least 100 to train")
    return text


def heavy_tailed_regression(
    n: int, features: int, generator: torch.Generator, *, df: int = 2, outliers: float = 0.02
) -> tuple[Tensor, Tensor, Tensor]:
    """A linear regression problem with Student-t noise and a few gross outliers.

    Every draw comes from ``generator`` (so the problem depends on the seed alone).

    Returns:
        ``(x, y, w_true)``; ``y = x @ w_true + noise``, noise ~ t(df) (df = 2: infinite
        variance) with a fraction ``outliers`` of targets multiplied by 50.
    """
    x = torch.randn(n, features, generator=generator)
    w_true = torch.randn(features, generator=generator)
    normal = torch.randn(n, generator=generator)
    chi2 = torch.randn(df, n, generator=generator).pow(2).sum(0)  # χ²(df), df an integer
    noise = normal / torch.sqrt(chi2 / df)
    y = x @ w_true + 0.5 * noise
    mask = torch.rand(n, generator=generator) < outliers
    y = torch.where(mask, y * 50, y)
    return x, y, w_true


def _find(directory: Path, stems: tuple[str, ...]) -> Path:
    """The first of ``stems`` (or ``stem.gz``) in ``directory``."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (directory / name).exists():
                return directory / name
    names = " or ".join(f"{stem}[.gz]" for stem in stems)
    raise DataError(f"--data {directory}: no {names} in this directory")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as error:
        raise DataError(f"--data {path}: not a readable .npz ({error})") from None
    for x_key, y_key in (("x_train", "y_train"), ("x", "y"), ("images", "labels")):
        if x_key in arrays and y_key in arrays:
            return arrays[x_key], arrays[y_key]
    raise DataError(
        f"--data {path}: expected arrays x_train/y_train, x/y or images/labels; "
        f"found {', '.join(arrays.files) or 'none'}"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise DataError(f"--data {path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"--data {path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes or ndim == 0:
        raise DataError(f"--data {path}: not an IDX file (type code {code:#x}, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"--data {path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"--data {path}: IDX header says {shape} ({expected} bytes) but "
            f"{len(raw) - header} bytes follow"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(np.float32 if dtype.kind == "f" else np.int64)
