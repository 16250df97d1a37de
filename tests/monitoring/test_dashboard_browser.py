"""The dashboard as a person sees it: opened from disk in headless Chromium (Debian's package,
installed here when missing), offline, with no console error, every section and plot drawn, and
a screenshot kept in `monitoring/out/screenshots/` for a person to look at."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from monitoring.dashboard import SECTIONS, build_dashboard

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "monitoring" / "out" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N_PLOTS = 6  # promotions, locality trends, weight change, clusters, flags, masks


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get when absent."""
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    for command in (install, ["apt-get", "update", "-q"], install):  # fresh lists if needed
        if CHROMIUM.is_file() or not shutil.which("apt-get"):
            break
        subprocess.run(command, check=False, capture_output=True)
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} missing and `apt-get install -y chromium` failed: install it")
    return CHROMIUM


@pytest.fixture
def page(chromium, tmp_path):
    """A fresh browser page (own profile folder) recording console errors and failed loads."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(chromium),
            args=CHROMIUM_FLAGS,
            offline=True,
            viewport={"width": 1280, "height": 900},
        )
        tab = browser.new_page()
        tab.problems = []
        tab.on("console", lambda m: m.type in ("error", "warning") and tab.problems.append(m.text))
        tab.on("pageerror", lambda error: tab.problems.append(str(error)))
        tab.on("requestfailed", lambda request: tab.problems.append(f"failed: {request.url}"))
        yield tab
        browser.close()


def test_dashboard_renders_in_chromium(two_nights, page):
    # Given the dashboard of two real nights, opened from disk with the network off
    built = build_dashboard(two_nights, log_to_mlflow=False)
    page.goto(built.path.as_uri())
    page.wait_for_load_state("load")

    # Then nothing went wrong in the console, and every section has content
    assert page.problems == []
    for key, title in SECTIONS:
        section = page.locator(f"section#{key}")
        assert section.locator("h2").inner_text() == title
        has_text = len(section.inner_text().strip()) > len(title)
        assert has_text or section.locator("img").count() > 0

    # and every plot and thumbnail decoded to a real image
    sizes = page.eval_on_selector_all(
        "img", "images => images.map(i => [i.className, i.naturalWidth])"
    )
    assert sum(kind == "plot" for kind, _ in sizes) == N_PLOTS
    assert any(kind == "thumb" for kind, _ in sizes)
    assert all(width > 0 for _, width in sizes)

    # and each edit row links to its cluster's thumbnails
    links = page.eval_on_selector_all(
        "#edits a", "links => links.map(a => !!document.getElementById(a.hash.slice(1)))"
    )
    assert links
    assert all(links)
    assert page.locator("#edits tr").count() == len(built.history.edits) + 1

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
