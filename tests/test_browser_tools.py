"""Real-browser walk through the Tools tab (headless Debian Chromium via Playwright, as tests/test_browser.py): a
finished demo-sd run -> Tools -> pick its adapter -> Info (layout and rank in the summary) -> Resize to rank 2 (the
file is written, offered for download and listed in Preview), and a screenshot."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import ROOT, finished_demo_run
from tests.test_browser import app_page, app_server, chromium_or_skip, publish_screenshots  # noqa: F401 (app_server: the fixture)

SCREENSHOT_COPY = ROOT / "docs" / "screenshots" / "ui-tools.png"

pytestmark = pytest.mark.slow


def run_and_wait(page, expected: str, timeout_s: float = 300) -> str:
    """Click Run and return the result box's text once the command has ended (it says "Running" until then)."""
    result = page.locator("#tools-result textarea")
    before = result.input_value()
    page.locator("#tools-run").click()
    end = time.time() + timeout_s
    while (text := result.input_value()) in ("", before) or text.startswith("Running"):
        assert time.time() < end, f"no result after {timeout_s} s: {text!r}"
        page.wait_for_timeout(250)
    assert re.search(expected, text, re.S), text
    return text


def test_tools_tab_info_and_resize_in_a_real_browser(app_server, tmp_path):  # noqa: F811
    sync_api = chromium_or_skip()
    url, outputs = app_server
    run_dir = finished_demo_run(outputs)
    shot = tmp_path / "ui-tools.png"
    started = time.time()
    with app_page(sync_api, tmp_path, url) as page:
        page.get_by_role("tab", name="Tools").click()
        page.locator("#tools-file input").click()
        page.get_by_role("option", name="demo-style / demo-style.safetensors", exact=True).click()

        info = run_and_wait(page, r"kohya.*4|4.*kohya")  # Info is the default command
        assert "Traceback" not in info, info

        page.locator("#tools-command").get_by_text("Resize", exact=True).click()
        rank = page.locator("#tools-rank input[type=number]")
        rank.fill("2")
        rank.press("Tab")
        resized = run_and_wait(page, r"Written: demo-style-r2\.safetensors")
        sync_api.expect(page.locator("#tools-download a")).to_have_attribute(
            "href", re.compile(r"/demo-style-r2\.safetensors$"))  # the download link
        page.wait_for_timeout(500)
        page.screenshot(path=str(shot), full_page=True)

        page.get_by_role("tab", name="Preview").click()
        page.locator("#preview-adapter input").click()
        sync_api.expect(page.get_by_role("option", name="demo-style-r2.safetensors (tools)")).to_be_visible()
    written = outputs / ".tools" / "local" / "demo-style-r2.safetensors"
    assert written.is_file() and run_dir.is_dir(), resized
    assert shot.stat().st_size > 10_000
    print(f"browser walk: {time.time() - started:.0f} s")
    publish_screenshots((shot, SCREENSHOT_COPY))
