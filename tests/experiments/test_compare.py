"""``compare`` end to end on a tiny budget, and the report in a real headless browser."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest

from gradclip.experiments.compare import SUMMARY_COLUMNS, compare, validate
from gradclip.experiments.runner import RESULT_COLUMNS, TIMING_COLUMNS
from gradclip.experiments.tasks import TaskOptions

CLIPS = ["none", "norm:0.05", "norm:1.0"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("study")
    return compare(
        ["lstm-sine-unstable"],
        CLIPS,
        seeds=2,
        options=TaskOptions(max_steps=40),
        out=out,
        command="test",
    )


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_file_is_written(study) -> None:  # type: ignore[no-untyped-def]
    names = {p.name for p in study.out.iterdir()}
    assert {"results.csv", "timings.csv", "summary.csv", "report.html"} <= names
    for kind in ("loss", "norms", "clip-rate", "time"):
        png = study.out / f"lstm-sine-unstable-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_csv_has_the_documented_columns_and_one_row_per_step(study) -> None:  # type: ignore[no-untyped-def]
    rows = read(study.out / "results.csv")
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert list(read(study.out / "timings.csv")[0]) == list(TIMING_COLUMNS)
    for result in study.results:
        mine = [r for r in rows if r["clip"] == result.clip and int(r["seed"]) == result.seed]
        assert [int(r["step"]) for r in mine] == list(range(1, len(result.rows) + 1))


def test_divergence_is_reported_while_the_others_finish(study) -> None:  # type: ignore[no-untyped-def]
    summary = {r["clip"]: r for r in read(study.out / "summary.csv")}
    assert list(next(iter(summary.values())))[: len(SUMMARY_COLUMNS)] == list(SUMMARY_COLUMNS)
    assert summary["none"]["diverged"] == "2" and int(summary["none"]["first_divergence_step"]) < 40
    assert summary["none"]["final_loss"] == "nan"
    for clip in ("norm:0.05", "norm:1.0"):
        assert summary[clip]["diverged"] == "0"
        assert float(summary[clip]["final_loss"]) > 0
    html = (study.out / "report.html").read_text()
    assert "no clipping diverged in 2 of 2 runs" in html


def test_trained_counts_the_runs_that_ended_below_their_start(study) -> None:  # type: ignore[no-untyped-def]
    """From results.csv alone: a run trained if its last tenth ends below its step-1 loss."""
    rows = read(study.out / "results.csv")
    summary = {r["clip"]: r for r in read(study.out / "summary.csv")}
    constant = float(summary["none"]["constant_loss"])
    assert 0.4 < constant < 0.6  # a sine wave's variance (1/2) plus the noise's (0.01)
    for clip in CLIPS:
        trained = 0
        for seed in ("0", "1"):
            losses = [float(r["loss"]) for r in rows if r["clip"] == clip and r["seed"] == seed]
            tail = losses[-max(1, len(losses) // 10) :]
            final = sum(tail) / len(tail)
            trained += final < losses[0] and final < constant
        assert summary[clip]["trained"] == str(trained), clip
    assert summary["norm:0.05"]["trained"] == "2" and summary["norm:1.0"]["trained"] == "0"
    html = (study.out / "report.html").read_text()
    assert "Clipping rescued training: without it 0 of 2 runs trained, with norm:0.05 every" in html
    assert "norm:1.0 did not train in 2 of 2 runs" in html


def test_clips_per_task(tmp_path: Path) -> None:
    study = compare(
        ["regression", "lstm-sine"],
        {"regression": ["none", "norm:1.0"], "lstm-sine": ["none"]},
        options=TaskOptions(max_steps=3),
        out=tmp_path,
    )
    assert [(s.task, s.clip) for s in study.summaries] == [
        ("regression", "none"), ("regression", "norm:1.0"), ("lstm-sine", "none"),
    ]  # fmt: skip
    assert (
        "regression: no clipping, norm:1.0; lstm-sine: no clipping"
        in (tmp_path / "report.html").read_text()
    )


@pytest.mark.parametrize(
    ("clips", "message"),
    [
        (["none", "none"], "--clip 'none' is given twice"),
        (["norm:1", "norm:1.0"], "--clip 'norm:1.0' is given twice (as 'norm:1' and 'norm:1.0')"),
        (["norm:abc"], "--clip 'norm:abc': max_norm must be a real number; got 'abc'"),
    ],
)
def test_bad_clips_are_value_errors_before_training(clips: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(["regression"], clips, 1)


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("lstm-sine", TaskOptions(text="x.txt"), "--text is read only by char-rnn"),
        ("regression", TaskOptions(data="x.npz"), "--data is read only by digits-mlp"),
        (
            "digits-mlp",
            TaskOptions(batch_size=100_000),
            "task digits-mlp: batch size 100000 is larger than the 1438 training examples",
        ),
        (
            "regression",
            TaskOptions(batch_size=5000),
            "task regression: batch size 5000 is larger than the 2048 training examples",
        ),
    ],
)
def test_options_a_task_cannot_use_are_rejected(
    task: str, options: TaskOptions, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate([task], ["none"], 1, options)


def test_same_seed_identical_results_csv(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    compare(["lstm-sine-unstable"], CLIPS, seeds=2, options=TaskOptions(max_steps=40), out=tmp_path)
    assert (tmp_path / "results.csv").read_bytes() == (study.out / "results.csv").read_bytes()


def test_report_opens_in_a_real_browser(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver must be installed in CI (make test does it)")
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (make test installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get((study.out / "report.html").as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        browser.set_window_size(1200, 2400)
        artifacts = Path(os.environ.get("GRADCLIP_TEST_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(artifacts / "report.png"))
    finally:
        browser.quit()
    assert len(images) == 4
    assert all(complete and width > 0 for _, complete, width in images), images
    assert errors == []
    assert (artifacts / "report.png").stat().st_size > 10_000
