"""Real-browser walk through the Saves tab (headless Debian Chromium via Playwright, as tests/test_browser.py): a
finished demo-sd run with three saves (steps 2, 4 and the final 6) -> the saves table -> a saves × strength grid
drawn on the preview worker -> the PNG with its labels in the text chunks, and a screenshot."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from tests.conftest import ROOT, finished_demo_run
from tests.test_browser import app_page, app_server, chromium_or_skip, publish_screenshots  # noqa: F401 (app_server: the fixture)

SCREENSHOT_COPY = ROOT / "docs" / "screenshots" / "ui-saves.png"

pytestmark = pytest.mark.slow


def test_saves_tab_grid_in_a_real_browser(app_server, tmp_path):  # noqa: F811
    sync_api = chromium_or_skip()
    url, outputs = app_server
    run_dir = finished_demo_run(outputs, steps=6, save_every=2)
    shot = tmp_path / "ui-saves.png"
    started = time.time()
    with app_page(sync_api, tmp_path, url) as page:
        page.get_by_role("tab", name="Saves").click()
        page.locator("#saves-run input").click()
        page.get_by_role("option", name="demo-style (done)").click()
        table = page.locator("#saves-table")
        for label in ("step 2", "step 4", "final (step 6)"):
            sync_api.expect(table).to_contain_text(label)
        field = page.locator("#saves-steps input[type=number]")
        field.fill("8")
        field.press("Tab")
        page.locator("#saves-grid-btn").click()
        status = page.locator("#saves-grid-status")
        sync_api.expect(status).to_contain_text("Drawing cell", timeout=300_000)  # per-cell progress
        sync_api.expect(status).to_contain_text("Grid done: 6 cells", timeout=600_000)
        sync_api.expect(status).to_contain_text("ms per cell")
        sync_api.expect(page.locator("#saves-grid-img img")).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shot), full_page=True)
    grids = sorted((outputs / ".preview" / "grids").glob("demo-style-grid-*.png"))
    assert len(grids) == 1, grids
    png = Image.open(grids[0])
    text = json.loads(png.text["style_lora_grid"])
    assert text["x_labels"] == ["step 2", "step 4", "final (step 6)"] and text["y_labels"] == ["strength 0.5",
                                                                                              "strength 1"]
    assert text["steps"] == 8 and len(text["cell_ms"]) == 6
    assert png.size == (128 + 3 * 128, 34 + 2 * 128)
    assert shot.stat().st_size > 10_000 and run_dir.is_dir()
    print(f"browser walk: {time.time() - started:.0f} s")
    publish_screenshots((shot, SCREENSHOT_COPY))
