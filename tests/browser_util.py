"""Helpers for the browser test (tests/test_browser.py): the real app in a subprocess and headless Debian Chromium.

No downloads: Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``); selenium is
pointed at them explicitly so selenium-manager never runs. The network here is closed, so Chromium's background
services (component updates, sync, QUIC probes) are switched off, else its connections are refused.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or ``None``."""
    for p, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not p.exists():
            return f"{p} is missing (apt-get install {pkg})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python app.py`` in its own session: a temporary SQLite database, the given bundle, a real gallery
    (``gallery``: a folder or CSV; default an empty folder, so phantoms only), one torch thread. stdout/stderr go to
    files under ``workdir``."""

    def __init__(self, model_dir: Path, workdir: Path, gallery: Path | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        if gallery is None:
            gallery = workdir / "empty-gallery"
            gallery.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / "app.stdout", workdir / "app.stderr"
        env = dict(os.environ, NEURAL_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(workdir / "gradio-tmp"),
                   PYTHONUNBUFFERED="1")
        env.pop("NEURAL_GALLERY", None)
        self.cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                    "--db", f"sqlite:///{workdir / 't.db'}", "--model", str(model_dir), "--device", "cpu",
                    "--gallery", str(gallery)]
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=workdir, env=env, stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    def stderr(self, tail: int = 4000) -> str:
        try:
            return self.err_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``GET /`` answers 200; raises ``AssertionError`` with the app's stderr otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode} before serving /; stderr:\n"
                                     f"{self.stderr()}")
            try:
                with urllib.request.urlopen(self.url, timeout=3) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"app not serving / after {timeout:.0f} s (last: {last}); stderr:\n{self.stderr()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, this process only (it leads its own session; nothing else is touched)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        for fh in (self._out, self._err):
            fh.close()


def make_driver(profile_dir: Path, width: int = 1400, height: int = 2400):
    """Headless Debian Chromium through Debian chromedriver (no selenium-manager)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
              "--no-default-browser-check", f"--window-size={width},{height}",
              f"--user-data-dir={profile_dir}"):
        opts.add_argument(a)
    service = Service(str(CHROMEDRIVER), log_output=str(profile_dir.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(240)   # a loaded 2-core machine takes minutes for the first page
    driver.set_script_timeout(180)
    return driver


def saturated_share(png: bytes, s_min: float = 0.35, v_min: float = 0.25, left: float = 1.0) -> float:
    """Share of pixels with HSV saturation >= ``s_min`` and value >= ``v_min`` (colormap colours; grey has none),
    over the left ``left`` fraction of the width (the heatmap's colour-bar legend sits on the right)."""
    import io

    import numpy as np
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.crop((0, 0, max(1, int(im.width * left)), im.height))
    hsv = np.asarray(im.convert("HSV"), dtype=np.float32) / 255.0
    s, v = hsv[..., 1], hsv[..., 2]
    return float(((s >= s_min) & (v >= v_min)).mean())
