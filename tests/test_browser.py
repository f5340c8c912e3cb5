"""End to end in a real browser: ``python app.py`` (tiny untrained bundle, open mode) driven by headless Debian
Chromium at 1366 x 768 the way a reader works: pick an example, look at the first view, move the keep slider,
switch the lung gate on and off (when the bundle has a lung model),
switch the correction mode, upload a study with a report, analyse it, answer with the keyboard, submit and land on
the next study with a fresh form. Every step fails on an "Error" badge or toast and on a field left over from the
previous study.

Slow (~2-4 min) and needs ``apt-get install chromium chromium-driver``; run with ``--run-slow``. Screenshots are
kept in pytest's tmp dir and copied to ``/tmp/neural_browser*.png`` for a human to look at; with
``NEURAL_SCREENSHOT_TO_DOCS=1`` the first view is also written, small, to ``docs/review_page.png`` (README's
picture; set ``NEURAL_BROWSER_MODEL=assets/default_model`` to show the trained model instead of the tiny one).
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

from tests.browser_util import ROOT, AppServer, browser_missing, make_driver, saturated_share

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SCREENSHOT_COPY = Path("/tmp/neural_browser.png")
DOCS_SCREENSHOT = ROOT / "docs" / "review_page.png"
ANALYSIS_TIMEOUT = 180.0
WIDTH, HEIGHT = 1366, 768

# JS probes -----------------------------------------------------------------------------------------------------
NONCE_JS = """
const v = document.querySelector(".nr-view[data-kind='" + arguments[0] + "']");
return v ? v.dataset.nonce : null;
"""
# the new picture of a view, decoded (not just in the DOM)
VIEW_READY_JS = """
const v = document.querySelector(".nr-view[data-kind='" + arguments[0] + "']");
if (!v || !v.dataset.nonce || v.dataset.nonce === arguments[1]) return null;
const imgs = Array.from(v.querySelectorAll('img'));
return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? v.dataset.nonce : null;
"""
# what fails the walk: an "Error" badge on any component, an error toast
ERRORS_JS = r"""
const out = [];
for (const e of document.querySelectorAll('.toast-body.error'))
  out.push('toast: ' + e.innerText.replace(/\s+/g, ' ').trim());
for (const e of document.querySelectorAll('body *')) {
  if (e.childElementCount === 0 && e.offsetParent !== null && e.textContent.trim() === 'Error')
    out.push('badge on ' + (e.closest('[id]') || {id: '?'}).id);
}
return out;
"""
PENDING_JS = """
return Array.from(document.querySelectorAll('.wrap, .progress-text, .eta-bar'))
  .some(e => (e.classList.contains('pending') || e.classList.contains('progress-text')
              || e.classList.contains('eta-bar')) && e.offsetParent !== null);
"""
# where an element sits in the window (for the first-view check)
BOX_JS = """
const e = document.querySelector(arguments[0]);
if (!e) return null;
const r = e.getBoundingClientRect();
return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, width: r.width, height: r.height,
        innerWidth: window.innerWidth, innerHeight: window.innerHeight};
"""
SET_SLIDER_JS = """
const r = document.querySelector(arguments[0] + ' input[type=range]');
const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
set.call(r, arguments[1]);
r.dispatchEvent(new Event('input', {bubbles: true}));
r.dispatchEvent(new Event('change', {bubbles: true}));
r.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));
"""
FORM_JS = """
return {verdict: Array.from(document.querySelectorAll('#verdict input:checked')).map(e => e.value),
        comment: (document.querySelector('#comment textarea') || {}).value,
        report: (document.querySelector('#report-input textarea') || {}).value,
        confidence: (document.querySelector('#confidence input[type=number]') || {}).value,
        submit: (document.querySelector('#submit-status') || {innerText: ''}).innerText,
        banner: (document.querySelector('#analysis-banner') || {innerText: ''}).innerText,
        wait: (document.querySelector('#nr-wait') || {innerText: ''}).innerText};
"""


def _tiny_png(side: int = 256) -> bytes:
    """A grey gradient PNG written without extra deps (the study to upload)."""
    rows = b"".join(b"\x00" + bytes(((x * 3 + y) * 255 // (4 * side - 4)) for x in range(side)) for y in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


class Walk:
    """The driver, the app and the checks every step repeats."""

    def __init__(self, driver, app: AppServer, tmp_path: Path):
        self.d, self.app, self.tmp = driver, app, tmp_path
        self.steps: list[str] = []

    def wait(self, cond, timeout: float, what: str, poll: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.app.proc.poll() is not None:
                raise AssertionError(f"app died while waiting for {what}; stderr:\n{self.app.stderr()}")
            v = cond()
            if v:
                return v
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (after {self.steps}); page "
                             f"errors: {self.errors()!r}; app stderr:\n{self.app.stderr()}")

    def errors(self) -> list[str]:
        return self.d.execute_script(ERRORS_JS)

    def settle(self, timeout: float = ANALYSIS_TIMEOUT) -> None:
        time.sleep(0.3)
        self.wait(lambda: not self.d.execute_script(PENDING_JS), timeout, "the page to settle")

    def check(self, step: str) -> None:
        """After a step: the page settles and shows no error."""
        self.steps.append(step)
        self.settle()
        time.sleep(0.4)             # a late second event (.then) would paint its badge now
        errs = self.errors()
        assert not errs, f"'Error' on the page after {step!r}: {errs}"

    def nonce(self, kind: str):
        return self.d.execute_script(NONCE_JS, kind)

    def new_picture(self, kind: str, old, what: str):
        return self.wait(lambda: self.d.execute_script(VIEW_READY_JS, kind, old), ANALYSIS_TIMEOUT, what)

    def form(self) -> dict:
        return self.d.execute_script(FORM_JS)

    def keys(self, text: str) -> None:
        """Type on the page itself (not in a text box), as shortcuts are."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.d.execute_script("document.activeElement && document.activeElement.blur && "
                              "document.activeElement.blur();")
        ActionChains(self.d).send_keys(text).perform()

    def click(self, el) -> None:
        """Scroll an element below the fold into view and click it, as a reader would."""
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        time.sleep(0.3)
        el.click()

    def css(self, sel: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, sel)

    def shot(self, name: str) -> Path:
        p = self.tmp / name
        p.write_bytes(self.d.get_screenshot_as_png())
        try:
            shutil.copyfile(p, Path("/tmp") / name)
        except OSError:
            pass
        return p


def _small_png(src: Path, dst: Path, width: int = 1100, limit: int = 150_000) -> int:
    """A copy of a screenshot small enough for the README: scaled to ``width`` and palette-quantised."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    h = round(im.height * width / im.width)
    small = im.resize((width, h), Image.LANCZOS)
    for colours in (128, 64, 32):
        buf = io.BytesIO()
        small.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        if buf.tell() <= limit:
            break
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())
    return buf.tell()


def test_reading_flow_in_chromium(tiny_bundle_dir, tmp_path):
    why = browser_missing()
    if why:
        pytest.skip(f"browser test needs Debian Chromium: {why}")
    from selenium.webdriver.common.by import By

    model_dir = Path(os.environ.get("NEURAL_BROWSER_MODEL") or tiny_bundle_dir)
    shipped_lung = ROOT / "assets" / "default_model" / "lung"
    if not (model_dir / "lung").is_dir() and shipped_lung.is_dir():
        # the tiny bundle plus the shipped lung model, so the page offers the lung gate (step 3b)
        with_lung = tmp_path / "bundle-with-lung"
        shutil.copytree(model_dir, with_lung)
        shutil.copytree(shipped_lung, with_lung / "lung")
        model_dir = with_lung
    app = AppServer(model_dir, tmp_path)
    driver = None
    try:
        app.wait_ready(timeout=400)
        profile = tmp_path / "chrome-profile"
        profile.mkdir()
        driver = make_driver(profile, WIDTH, HEIGHT)
        driver.get(app.url)
        w = Walk(driver, app, tmp_path)
        w.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#analyze-btn"), 60, "the Analyze button")
        assert w.css("#model-banner").text.strip(), "the model banner is empty"

        # 1. an example from the gallery: the first view holds the image, its heatmap and the prediction
        thumbs = w.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#example-gallery .thumbnail-item"), 60,
                        "the example gallery thumbnails")
        old = w.nonce("attention")
        thumbs[0].click()
        w.new_picture("attention", old, "the example's attention view")
        w.check("pick example 1")
        w.wait(lambda: "Pneumonia:" in w.css("#prediction").text, 60, "the prediction")
        time.sleep(0.5)
        first_view = w.shot("neural_browser.png")
        f = w.form()
        assert "SYNTHETIC" in f["banner"], f
        assert f["wait"].startswith("You waited"), f"the reader's wait is not shown: {f}"
        for sel in ("#view-attention .nr-stage", "#view-original .nr-stage", "#view-kept .nr-stage",
                    "#prediction h3"):
            box = driver.execute_script(BOX_JS, sel)
            assert box and box["height"] > 20 and box["bottom"] <= box["innerHeight"] + 1 and \
                box["right"] <= box["innerWidth"] + 1, f"{sel} is not in the first view at {WIDTH}x{HEIGHT}: {box}"
        stage = driver.execute_script(BOX_JS, "#view-attention .nr-stage")
        assert stage["width"] >= 180, f"the attention view is drawn small: {stage}"
        heat = w.css("#view-attention .nr-stage")
        share = saturated_share(heat.screenshot_as_png)
        assert share >= 0.2, f"the heatmap overlay did not render ({share:.1%} colourful pixels)"
        if os.environ.get("NEURAL_SCREENSHOT_TO_DOCS") == "1":
            n = _small_png(first_view, DOCS_SCREENSHOT)
            assert n <= 150_000, f"docs screenshot is {n} bytes"

        # 2. shared zoom: a wheel over one view zooms every view alike
        driver.execute_script("""
            const st = document.querySelector('#view-attention .nr-stage'); const r = st.getBoundingClientRect();
            st.dispatchEvent(new WheelEvent('wheel', {deltaY: -400, clientX: r.left + r.width / 2,
                                                      clientY: r.top + r.height / 2, bubbles: true}));""")
        transforms = driver.execute_script(
            "return Array.from(document.querySelectorAll('.nr-canvas')).map(c => c.style.transform);")
        assert len(set(transforms)) == 1 and "scale(1)" not in transforms[0], transforms
        w.keys("0")                                                                   # reset

        # 3. the keep slider: a new kept view, no error; the same value again (Tab after typing) changes nothing
        old = w.nonce("kept")
        driver.execute_script(SET_SLIDER_JS, "#keep-slider", 0.3)
        w.new_picture("kept", old, "the kept view at keep 0.3")
        w.check("keep slider to 0.3")
        now = w.nonce("kept")
        driver.execute_script(SET_SLIDER_JS, "#keep-slider", 0.3)
        w.check("keep slider to 0.3 again")
        assert w.nonce("kept") == now, "the same keep value drew the kept view again"

        # 3b. the optional lung gate (More settings): the heatmap is redrawn and labelled gated, then back
        if (model_dir / "lung").is_dir():
            w.click(driver.find_element(By.XPATH, "//button[contains(., 'More settings')]"))
            time.sleep(0.5)
            kept = w.nonce("kept")
            for on in (True, False):
                old = w.nonce("attention")
                w.click(w.css("#lung-gate input[type=checkbox]"))
                w.new_picture("attention", old, f"the attention view with the lung gate {'on' if on else 'off'}")
                w.check(f"lung gate {'on' if on else 'off'}")
                note = w.css("#view-attention .nr-view").text
                assert "Map: " in note and (("LUNG-GATED" in note) == on or "shown ungated" in note), note
            assert w.nonce("kept") != kept and "regions kept" in w.css("#view-kept .nr-view").text

        # 4. the correction mode switch blanks nothing
        w.click(driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Correct the kept regions')]"))
        w.check("open the corrections tab")
        attention = w.nonce("attention")
        w.click(driver.find_element(By.XPATH, "//*[@id='correction-mode']//label[contains(., 'not needed')]"))
        w.check("switch the correction mode")
        assert w.nonce("attention") == attention and w.css("#grid-image img").get_attribute("src")

        # 5. an upload clears the example's report and results; a report typed in is the one applied
        png = tmp_path / "study.png"
        png.write_bytes(_tiny_png())
        w.css("#study-file input[type=file]").send_keys(str(png))
        w.wait(lambda: "New study uploaded" in w.form()["banner"], 60, "the upload to clear the page")
        w.check("upload a study")
        f = w.form()
        assert f["report"] == "" and f["verdict"] == [] and not driver.find_elements(
            By.CSS_SELECTOR, ".nr-view[data-kind='attention'] img"), f"stale fields after an upload: {f}"
        w.css("#report-input textarea").send_keys("Patchy opacity in the right lower lobe.")
        time.sleep(0.5)
        old = w.nonce("attention")
        w.css("#analyze-btn").click()
        w.new_picture("attention", old, "the uploaded study's views")
        w.check("analyze the upload")
        f = w.form()
        assert "uploaded PNG" in f["banner"] and "report given" in f["banner"], f

        # 6. answer with the keyboard, submit: saved, form fresh, asked for the next upload
        w.keys("p")
        w.wait(lambda: w.form()["verdict"] == ["partly"], 10, "the 'p' shortcut")
        w.css("#comment textarea").send_keys("upload: right base")
        w.keys("n")
        w.wait(lambda: "Saved annotation" in w.form()["submit"], 60, "the submit")
        w.check("submit the upload")
        f = w.form()
        assert f["verdict"] == [] and f["comment"] == "" and "Upload the next study" in f["submit"], f

        # 7. an example, answered and submitted with the keyboard: the next example opens with a fresh form
        old = w.nonce("attention")
        w.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#example-gallery .thumbnail-item"), 10,
               "the gallery")[0].click()
        w.new_picture("attention", old, "example 1 again")
        w.check("pick example 1 again")
        first_banner = w.form()["banner"]
        w.keys("d")
        w.wait(lambda: w.form()["verdict"] == ["disagree"], 10, "the 'd' shortcut")
        w.css("#comment textarea").send_keys("misses the left base")
        old = w.nonce("attention")
        w.keys("n")
        w.new_picture("attention", old, "the next study after submit")
        w.check("submit and next")
        f = w.form()
        assert "Saved annotation" in f["submit"] and "next study" in f["submit"], f
        assert f["banner"] != first_banner and ("#1" in f["banner"] or "Phantom" in f["banner"]), f
        assert f["verdict"] == [] and f["comment"] == "" and f["confidence"] in ("3", None), \
            f"the second study's form is not fresh: {f}"
        w.shot("neural_browser_second.png")
        print(f"\nwalked: {w.steps}; waits: {driver.execute_script('return window.__nrTimes')}")
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # the browser may already be gone; the app must still be stopped
                pass
        app.stop()
