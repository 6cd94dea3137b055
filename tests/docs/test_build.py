"""The documentation site builds in strict mode, and its API reference covers ``gradclip.__all__``.

``mkdocs build --strict`` turns every warning into an error: a page missing from the
navigation, a link to a missing page or anchor, a snippet file that does not exist,
an object mkdocstrings cannot find. The test builds into a temporary directory, so it
leaves nothing behind. Without MkDocs installed it skips, unless the ``CI``
environment variable is set: in CI a missing toolchain is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradclip

from ._markdown import ROOT

REQUIRED = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        message = (
            f"the docs toolchain is not installed ({', '.join(missing)} missing); "
            "install it with pip install -e '.[docs]'"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the docs must build in CI)")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a build warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "guide" / "why-clip" / "index.html").is_file()


def test_api_reference_documents_all_of_gradclip(site: Path) -> None:
    """Every public name has its own entry (an element with its id) in the reference."""
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "reference").rglob("*.html"))
    ids = set(re.findall(r'id="(gradclip\.[\w.]+)"', html))
    missing = [name for name in gradclip.__all__ if f"gradclip.{name}" not in ids]
    assert not missing, f"not in the API reference: {missing}"


def test_reference_entries_have_docstrings(site: Path) -> None:
    """An entry rendered from an empty docstring would be a bare signature."""
    for name in gradclip.__all__:
        obj = getattr(gradclip, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"gradclip.{name} has no docstring"


def test_benchmark_results_are_included(site: Path) -> None:
    page = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    first_heading = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()[0].lstrip("# ")
    assert first_heading in page
