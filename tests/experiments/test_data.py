"""Data loaders: IDX (gzipped or not) and .npz image sets, text files, and their errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradclip.experiments import data
from gradclip.experiments.runner import run
from gradclip.experiments.tasks import TaskOptions, get_task


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def mnist_like() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40).astype(
        np.uint8
    )


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_round_trip(tmp_path: Path, mnist_like, compress: bool) -> None:  # type: ignore[no-untyped-def]
    images, labels = mnist_like
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=compress)
    x, y = data.load_images(path)
    assert x.shape == (40, 784) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor(images.reshape(40, -1) / 255.0, dtype=torch.float32))
    assert y.tolist() == labels.tolist()
    x_dir, y_dir = data.load_images(tmp_path)  # a directory finds the training files
    assert torch.equal(x_dir, x) and torch.equal(y_dir, y)


@pytest.mark.parametrize(
    ("x_key", "y_key"), [("x_train", "y_train"), ("x", "y"), ("images", "labels")]
)
def test_npz_layouts(tmp_path: Path, mnist_like, x_key: str, y_key: str) -> None:  # type: ignore[no-untyped-def]
    images, labels = mnist_like
    path = tmp_path / "mnist.npz"
    np.savez(path, **{x_key: images, y_key: labels})
    x, y = data.load_images(path)
    assert x.shape == (40, 784) and float(x.max()) == pytest.approx(images.max() / 255.0)
    assert y.tolist() == labels.tolist()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.npz", "no such file"),
        (lambda d: _write(d / "bad-images-idx3-ubyte", b"\x01\x02\x03\x04"), "not an IDX file"),
        (
            lambda d: _write(
                d / "t-images-idx3-ubyte", bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3
            ),
            "bytes follow",
        ),
        (lambda d: _npz(d / "wrong.npz", a=np.zeros(3)), "expected arrays x_train/y_train"),
        (lambda d: _npz(d / "mismatch.npz", x=np.zeros((4, 2)), y=np.zeros(3)), "expected images"),
        (lambda d: d, "no train-images-idx3-ubyte"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.load_images(path)


def test_idx_without_labels_beside_it(tmp_path: Path, mnist_like) -> None:  # type: ignore[no-untyped-def]
    path = write_idx(tmp_path / "x-images-idx3-ubyte", mnist_like[0])
    with pytest.raises(data.DataError, match="no labels file x-labels-idx1-ubyte"):
        data.load_images(path)


def test_text(tmp_path: Path) -> None:
    default = data.load_text()
    assert len(default) > 100_000 and "def" in default
    path = tmp_path / "t.txt"
    path.write_text("hello world. " * 20, encoding="utf-8")
    assert data.load_text(path).startswith("hello world.")
    short = tmp_path / "s.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(data.DataError, match="4 characters; need at least 100"):
        data.load_text(short)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 100)
    with pytest.raises(data.DataError, match="not a UTF-8 text file"):
        data.load_text(binary)


def test_regression_problem_depends_on_the_seed_alone() -> None:
    a = data.heavy_tailed_regression(64, 5, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG must not matter
    b = data.heavy_tailed_regression(64, 5, torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    residual = a[1] - a[0] @ a[2]
    assert residual.abs().max() > 20 * residual.abs().median()  # heavy tails and outliers


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_a_directory_with_dot_separated_idx_names(
    tmp_path: Path, mnist_like, compress: bool
) -> None:  # type: ignore[no-untyped-def]
    images, labels = mnist_like
    write_idx(tmp_path / "train-images.idx3-ubyte", images, compress=compress)
    write_idx(tmp_path / "train-labels.idx1-ubyte", labels, compress=compress)
    x, y = data.load_images(tmp_path)
    torch.testing.assert_close(x, torch.tensor(images.reshape(40, -1) / 255.0, dtype=torch.float32))
    assert y.tolist() == labels.tolist()


def test_digits_mlp_trains_on_an_idx_directory(tmp_path: Path, mnist_like) -> None:  # type: ignore[no-untyped-def]
    """The task end to end on IDX files: 28x28 inputs, ten classes, steps and an accuracy."""
    images, labels = mnist_like
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=True)
    options = TaskOptions(data=str(tmp_path), batch_size=8, max_steps=6)
    trainable = get_task("digits-mlp").build(options, 0)
    assert trainable.model.net[0].in_features == 784  # type: ignore[index]
    assert trainable.model.net[-1].out_features == int(labels.max()) + 1  # type: ignore[index]
    assert trainable.settings["examples"] == 32  # 40 images, a fifth held out
    result = run("digits-mlp", "norm:1.0", 0, options)
    assert [r["step"] for r in result.rows] == [1, 2, 3, 4, 5, 6] and not result.diverged
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
