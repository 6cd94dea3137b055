"""``compare`` end to end on a tiny budget, and the report in a real headless browser."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from gradclip.experiments.compare import SUMMARY_COLUMNS, compare
from gradclip.experiments.runner import RESULT_COLUMNS, TIMING_COLUMNS
from gradclip.experiments.tasks import TaskOptions

CLIPS = ["none", "norm:1.0", "autoclip:p=10"]


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
    for clip in ("norm:1.0", "autoclip:p=10"):
        assert summary[clip]["diverged"] == "0"
        assert float(summary[clip]["final_loss"]) > 0
    html = (study.out / "report.html").read_text()
    assert "no clipping diverged in 2 of 2 runs" in html
    assert "Clipping prevented divergence" in html


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
