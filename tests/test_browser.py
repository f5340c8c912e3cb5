"""End to end in a real browser: ``python app.py`` (tiny untrained bundle, open mode) driven by headless Debian
Chromium the way a person would use it: pick the first example (a SYNTHETIC phantom), press Analyze, and check that
the attention heatmap and the fused graph actually render on the page.

Slow (~1-2 min) and needs ``apt-get install chromium chromium-driver``; run with ``--run-slow``. A full-page
screenshot is kept in pytest's tmp dir and copied to ``/tmp/neural_browser.png`` for a human to look at.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.browser_util import AppServer, browser_missing, make_driver, saturated_share

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SCREENSHOT_COPY = Path("/tmp/neural_browser.png")
ANALYSIS_TIMEOUT = 180.0

# JS probes -----------------------------------------------------------------------------------------------------
HEATMAP_SRC_JS = """
const img = document.querySelector('#heatmap-image img');
return img && img.getAttribute('src') && img.complete && img.naturalWidth > 0 ? img.getAttribute('src') : null;
"""
GRAPH_JS = """
const root = document.querySelector('#graph-plot');
if (!root) return null;
const plot = root.querySelector('.js-plotly-plot');
if (!plot) return null;
return {svgs: root.querySelectorAll('svg.main-svg').length,
        traces: root.querySelectorAll('g.trace.scatter').length,
        points: root.querySelectorAll('path.point').length,
        lines: root.querySelectorAll('g.trace.scatter path.js-line').length,
        data: (plot.data || []).length,
        height: plot.getBoundingClientRect().height};
"""
PENDING_JS = """
return Array.from(document.querySelectorAll('.wrap, .progress-text, .eta-bar'))
  .some(e => (e.classList.contains('pending') || e.classList.contains('progress-text')
              || e.classList.contains('eta-bar')) && e.offsetParent !== null);
"""
ERRORS_JS = """
return Array.from(document.querySelectorAll('.toast-body.error'))
  .map(e => e.innerText.replace(/\s+/g, ' ').trim()).filter(t => t);
"""
# counts the event calls the page sends (Gradio posts each event to .../queue/join)
COUNT_JOINS_JS = """
if (!window.__neuralJoins) {
  window.__neuralJoins = 0;
  const orig = window.fetch;
  window.fetch = function (u, ...rest) {
    if (String(u && u.url || u).includes('queue/join')) window.__neuralJoins++;
    return orig.call(this, u, ...rest);
  };
}
return window.__neuralJoins;
"""


def _tiny_png(side: int = 256) -> bytes:
    """A grey gradient PNG (no colour at all) written without extra deps: the upload fallback."""
    rows = b"".join(b"\x00" + bytes(((x + y) * 255 // (2 * side - 2)) for x in range(side)) for y in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _wait(driver, cond, timeout: float, what: str, app: AppServer, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.proc.poll() is not None:
            raise AssertionError(f"app died while waiting for {what}; stderr:\n{app.stderr()}")
        v = cond()
        if v:
            return v
        time.sleep(poll)
    errors = driver.execute_script(ERRORS_JS)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page errors: {errors!r}; "
                         f"app stderr:\n{app.stderr()}")


def _results_ready(driver):
    src = driver.execute_script(HEATMAP_SRC_JS)
    g = driver.execute_script(GRAPH_JS)
    if not src or not g or not g["svgs"] or (g["points"] < 2 and g["traces"] < 2):
        return None
    return src, g


def _full_page_png(driver) -> bytes:
    """The whole page, also below the fold (Chrome DevTools ``captureBeyondViewport``)."""
    import base64

    m = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = m.get("cssContentSize") or m["contentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    return base64.b64decode(shot["data"])


def _settle(driver, app: AppServer, timeout: float) -> None:
    """After an event fires: wait for Gradio's pending overlay to show (briefly, it may be missed) and clear."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8 and not driver.execute_script(PENDING_JS):
        time.sleep(0.1)
    _wait(driver, lambda: not driver.execute_script(PENDING_JS), timeout, "the analysis to finish", app)


def test_review_page_renders_heatmap_and_graph(tiny_bundle_dir, tmp_path):
    why = browser_missing()
    if why:
        pytest.skip(f"browser test needs Debian Chromium: {why}")
    from selenium.webdriver.common.by import By

    app = AppServer(tiny_bundle_dir, tmp_path)
    driver = None
    try:
        app.wait_ready(timeout=120)
        profile = tmp_path / "chrome-profile"
        profile.mkdir()
        driver = make_driver(profile, 1400, 2400)
        driver.get(app.url)
        _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#analyze-btn"), 60, "the Analyze button", app)
        banner = driver.find_element(By.CSS_SELECTOR, "#model-banner").text
        assert banner.strip(), "the model banner is empty"

        # 1. load a study the way a person would: the first example of the gallery (a SYNTHETIC phantom)
        force_upload = os.environ.get("NEURAL_BROWSER_STUDY") == "upload"   # to exercise the fallback path
        thumbs = _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#example-gallery .thumbnail-item"),
                       60, "the example gallery thumbnails", app)
        loaded_by = "gallery"
        try:
            if force_upload:
                raise AssertionError("NEURAL_BROWSER_STUDY=upload")
            thumbs[0].click()
            _settle(driver, app, ANALYSIS_TIMEOUT)
            _wait(driver, lambda: _results_ready(driver), 30, "the gallery example's views", app)
        except AssertionError as exc:
            # fallback: upload a small PNG through the file input
            loaded_by = f"upload (gallery click failed: {str(exc)[:300]})"
            png = tmp_path / "study.png"
            png.write_bytes(_tiny_png())
            driver.find_element(By.CSS_SELECTOR, "#study-file input[type=file]").send_keys(str(png))
            _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#study-file a, #study-file .file-name,"
                                                                       " #study-file table"),
                  60, "the upload to show up", app)
        banner_text = driver.find_element(By.CSS_SELECTOR, "#analysis-banner").text

        # 2. Analyze
        joins = driver.execute_script(COUNT_JOINS_JS)
        driver.find_element(By.CSS_SELECTOR, "#analyze-btn").click()
        _wait(driver, lambda: driver.execute_script(COUNT_JOINS_JS) > joins, 30,
              "the Analyze click to send an event", app, poll=0.1)
        _settle(driver, app, ANALYSIS_TIMEOUT)
        src, graph = _wait(driver, lambda: _results_ready(driver), ANALYSIS_TIMEOUT,
                           "the heatmap image and the plotly graph", app)
        errors = driver.execute_script(ERRORS_JS)
        assert not errors, f"error toasts on the page after Analyze (loaded by {loaded_by}): {errors}"
        banner_after = driver.find_element(By.CSS_SELECTOR, "#analysis-banner").text
        assert "UNTRAINED" in banner_after, f"the analysis banner does not flag the untrained model: {banner_after!r}"
        if loaded_by == "gallery":
            assert "SYNTHETIC" in banner_after, f"a phantom is not marked SYNTHETIC: {banner_after!r} " \
                                                f"(before Analyze: {banner_text!r})"

        # 3. screenshots: the whole page for a human, the heatmap element for the colour check
        time.sleep(1.0)  # let plotly finish its transitions before the picture
        page_png = tmp_path / "neural_browser.png"
        page_png.write_bytes(_full_page_png(driver))
        try:
            shutil.copyfile(page_png, SCREENSHOT_COPY)
        except OSError:
            pass
        heat = driver.find_element(By.CSS_SELECTOR, "#heatmap-image img")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", heat)
        heat_png = heat.screenshot_as_png
        from PIL import Image

        w, h = Image.open(io.BytesIO(heat_png)).size
        assert w >= 100 and h >= 100, f"the heatmap is drawn tiny: {w}x{h} px"
        # the radiograph part only (the colour-bar legend on the right is colourful even without an overlay)
        share = saturated_share(heat_png, left=0.8)
        assert share >= 0.2, (f"the heatmap's image area has only {share:.1%} colourful pixels: the colormap "
                              f"overlay did not render (src={src[:80]!r})")

        # the fused graph: several scatter traces (edges, bridge, patch nodes, entity nodes) with node markers
        assert graph["traces"] >= 2, f"the graph has {graph['traces']} scatter traces: {graph}"
        assert graph["points"] >= 5, f"the graph has only {graph['points']} node markers: {graph}"
        assert graph["height"] >= 300, f"the graph is squashed: {graph}"
        print(f"\nloaded by {loaded_by}; heatmap {w}x{h} px, {share:.1%} saturated; graph {graph}; "
              f"screenshot {page_png}")
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # the browser may already be gone; the app must still be stopped
                pass
        app.stop()
