"""One real-browser test: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser is
downloaded) clicks through upload -> caption grid -> Train -> live panel -> download, and saves a screenshot."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_STYLE, free_port, wait_for_run_end

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT_COPY = ROOT / "docs" / "screenshots" / "ui-train.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow


def chromium_or_skip():
    """playwright's sync_api. .ci/run installs Chromium: in CI a missing browser is a failure, on a dev machine a
    skip with the fix."""
    if not Path(CHROMIUM).exists():
        assert not os.environ.get("CI"), f"{CHROMIUM} missing in CI"
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


@contextlib.contextmanager
def app_page(sync_api, tmp_path: Path, url: str, **context):
    """A page of the app at `url` in headless Chromium with a fresh profile folder (Playwright passes it as
    --user-data-dir), closed afterwards. `context`: more launch_persistent_context options."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1400}, **context)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def publish_screenshots(*pairs: tuple[Path, Path]) -> None:
    """`make screenshots` (STYLE_LORA_SCREENSHOTS): copy each (shot, README picture); otherwise nothing."""
    if os.environ.get("STYLE_LORA_SCREENSHOTS"):
        for shot, copy in pairs:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, copy)


@pytest.fixture
def app_server(tmp_path):
    """`python -m app` as a real separate server process, as a user would start it."""
    outputs = tmp_path / "outputs"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--outputs", str(outputs)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    end = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > end:
                raise AssertionError("server did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.5)
    yield url, outputs
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(15)
    log.close()
    from app import jobs

    for st in jobs.list_runs(outputs):  # trainers run in their own sessions: never leave one behind
        pid = jobs.read_job(st.run_dir).get("pid")
        if st.state in ("running", "stopping") and pid:
            os.kill(pid, signal.SIGKILL)


def test_click_through_upload_train_download(app_server, tmp_path):
    sync_api = chromium_or_skip()
    url, outputs = app_server
    shot = tmp_path / "ui-train.png"
    with app_page(sync_api, tmp_path, url, accept_downloads=True) as page:
        # Dataset: drop the example images and captions -> the caption grid fills in
        page.locator("#upload input[type=file]").set_input_files(sorted(str(p) for p in TINY_STYLE.iterdir()))
        grid = page.locator("#caption-grid")
        sync_api.expect(grid).to_contain_text("11_green_triangle.png", timeout=60_000)
        sync_api.expect(page.locator("#dataset-status")).to_contain_text("12 images, 12 usable")
        page.wait_for_timeout(1000)  # thumbnails
        page.screenshot(path=str(tmp_path / "ui-dataset.png"), full_page=True)

        # Train: the demo base and tiny preset are preselected; make it short, then Train
        page.get_by_role("tab", name="Train").click()
        steps = page.get_by_label("Steps", exact=True)
        steps.fill("6")
        steps.press("Tab")
        page.locator("#train-btn").click()

        # Runs: the live panel follows the run until it is done
        status = page.locator("#run-status")
        sync_api.expect(status).to_contain_text("running", timeout=120_000)
        page.reload()  # the page reattaches to the running run (state lives in the run folders)
        page.get_by_role("tab", name="Runs").click()
        sync_api.expect(status).to_contain_text("my-style: running", timeout=60_000)
        run_dir = next(p for p in outputs.iterdir() if (p / "job.json").is_file())
        ended = wait_for_run_end(run_dir)  # follows the run's events: as long as the machine needs, no guess
        assert ended.state == "done", f"{ended.state}: {ended.reason}"
        sync_api.expect(status).to_contain_text("done", timeout=60_000)  # the panel's next refresh shows it
        sync_api.expect(status).to_contain_text("6/6")
        link = page.locator("#downloads a[href$='.diffusers.safetensors']").first
        sync_api.expect(link).to_be_visible(timeout=30_000)
        with page.expect_download() as info:
            link.click()
        saved = tmp_path / info.value.suggested_filename
        info.value.save_as(saved)
        page.wait_for_timeout(1500)  # let the plot and gallery finish drawing
        page.screenshot(path=str(shot), full_page=True)

    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        assert len(list(f.keys())) > 0
    assert saved.name.endswith(".safetensors")
    assert shot.stat().st_size > 10_000 and (tmp_path / "ui-dataset.png").stat().st_size > 10_000
    publish_screenshots((shot, SCREENSHOT_COPY),
                        (tmp_path / "ui-dataset.png", SCREENSHOT_COPY.with_name("ui-dataset.png")))
