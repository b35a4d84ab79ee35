"""The HTML leaderboard in a real browser: headless Chromium renders it, screenshots it, and its own
JavaScript sorts the rows (`#sort=<column>:<dir>` runs the same sort a header click does).

CI installs Debian's `chromium` (.ci/run); without it these tests skip with that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from distillbench.leaderboards.build import build

from tests.test_leaderboard import write

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")


def chromium(tmp_path, *args: str) -> str:
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    for seed, top1 in enumerate((90.0, 91.0, 93.0)):
        write(root / "results", "kd", seed, top1)
    write(root / "results", "vanilla", 0, 88.0, teacher=False)
    write(root / "results", "dkd", 0, 92.0)
    build(root / "results", root / "out", reported=None, png=False)
    return root / "out" / "digits.html"


def _methods(dom: str) -> list[str]:
    return re.findall(r'<tr data-method="([^"]+)"', dom)


def test_rows_render_and_screenshot(page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,700", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert _methods(dom) == ["dkd", "kd", "vanilla"]  # rank order
    assert "91.33 ± 1.53" in dom and 'id="excluded"' in dom


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("top1:asc", ["vanilla", "kd", "dkd"]),
        ("method:desc", ["vanilla", "kd", "dkd"]),
    ],
)
def test_page_sorts_in_the_browser(page, tmp_path, sort, expected):
    dom = chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#sort={sort}")
    assert _methods(dom) == expected
    key = sort.split(":")[0]
    assert re.search(rf'<th data-key="{key}"[^>]*data-dir="{sort.split(":")[1]}"', dom)
