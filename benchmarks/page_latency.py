"""What a reader waits for on the real page, against the pipeline's own time in the same run.

1. *Gallery click -> heatmap visible*: headless Debian Chromium clicks an example of the gallery of a running
   ``python app.py`` and the clock stops when the new attention view's images are decoded and a frame is scheduled
   (a probe in the page: ``performance.now()`` around the click, polling every 5 ms for the view's new nonce, then
   ``img.decode()`` and ``requestAnimationFrame``). Each example is a different study, clicked once, so the report
   model really runs every time (its cache would hide it). Baseline: ``Pipeline.analyze`` of the same files with
   the same reports, in this process, uncached, one thread like the app.
2. *Keep slider -> new overlay*: the keep slider is set and released on the last study; the clock stops when the
   new kept view is decoded. Baseline: ``Pipeline.prune_and_classify`` for the same keep values from the cached
   report model output.

The page's second event (explanation and graph, drawn after the pictures) is waited for before the next step, so
steps never overlap. Targets (issue #12): click -> heatmap <= 1.5 s median, slider -> overlay <= 0.5 s, on 2 idle
cores.

    .venv/bin/python benchmarks/page_latency.py [--quick] [--n N] [--model DIR]

Studies: the first N radiographs of ``../shared/data/covid-cxr`` with their notes as reports (else SYNTHETIC
phantoms). Needs ``apt-get install chromium chromium-driver``. Prints a table, writes
``benchmarks/results/page_latency.json``. No assertions.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NEURAL_THREADS", "1")     # the same single thread the app under test gets

from _common import ROOT, SHARED_DATA, bundle_info, machine, ms, stats, table, write_json  # noqa: E402

KEEPS = [0.15, 0.2, 0.25, 0.3, 0.12, 0.08, 0.05, 0.1]
N_PHANTOMS = 4                                   # the app's gallery starts with its phantoms

CLICK_JS = """
const done = arguments[arguments.length - 1];
const [index, kind] = [arguments[0], arguments[1]];
const view = () => document.querySelector(".nr-view[data-kind='" + kind + "']");
const old = view() ? view().dataset.nonce : null;
const t0 = performance.now();
if (index === null) {
  const r = document.querySelector('#keep-slider input[type=range]');
  const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  set.call(r, arguments[2]);
  r.dispatchEvent(new Event('input', {bubbles: true}));
  r.dispatchEvent(new Event('change', {bubbles: true}));
  r.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));
} else {
  document.querySelectorAll('#example-gallery .thumbnail-item')[index].click();
}
const poll = () => {
  const v = view();
  if (v && v.dataset.nonce && v.dataset.nonce !== old) {
    Promise.all(Array.from(v.querySelectorAll('img')).map(i => i.decode().catch(() => null)))
      .then(() => requestAnimationFrame(() => done(performance.now() - t0)));
  } else if (performance.now() - t0 > 120000) {
    done(-1);
  } else {
    setTimeout(poll, 5);
  }
};
poll();
"""
PENDING_JS = """
return Array.from(document.querySelectorAll('.wrap, .progress-text, .eta-bar'))
  .some(e => (e.classList.contains('pending') || e.classList.contains('progress-text')
              || e.classList.contains('eta-bar')) && e.offsetParent !== null);
"""


def studies(n: int, folder: Path) -> list[tuple[Path, str]]:
    """``n`` distinct studies written into ``folder`` (image + same-name .txt report) for the app's gallery."""
    out: list[tuple[Path, str]] = []
    meta = SHARED_DATA / "covid-cxr" / "metadata.csv"
    if meta.is_file():
        with meta.open(newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh):
                src = meta.parent / (row.get("folder") or "images") / row.get("filename", "")
                if len(out) >= n:
                    break
                if "x-ray" not in (row.get("modality") or "").lower() or not src.is_file():
                    continue
                dst = folder / f"{len(out):02d}{src.suffix.lower()}"
                shutil.copyfile(src, dst)
                report = (row.get("clinical_notes") or "").strip()
                dst.with_suffix(".txt").write_text(report, encoding="utf-8")
                out.append((dst, report))
    if len(out) < n:
        import cv2

        from neural_core.phantoms import phantom

        for seed in range(100, 100 + n - len(out)):
            p = phantom(seed, height=1024, width=1024)
            dst = folder / f"{len(out):02d}.png"
            cv2.imwrite(str(dst), p.xray.raw)
            dst.with_suffix(".txt").write_text(p.report, encoding="utf-8")
            out.append((dst, p.report))
    return out


def pipeline_times(model: str | None, items: list[tuple[Path, str]]) -> tuple[list[float], list[float], dict]:
    """The pipeline's own seconds: analyze of each study (fresh pipeline: nothing cached) and re-prune of the last."""
    from neural_core.bundle import load_bundle
    from neural_core.config import PruneConfig
    from neural_core.io import load_image
    from neural_core.pipeline import Pipeline

    bundle = load_bundle(model, device="cpu")
    pipe = Pipeline(bundle)
    pipe.warmup()
    analyze = []
    for path, report in items:
        t = time.perf_counter()
        pipe.analyze(str(path), report or None, keep=0.1, context_side=32)
        analyze.append(time.perf_counter() - t)
    out, _ = pipe.vlm(load_image(str(items[-1][0])), items[-1][1] or None)
    reprune = []
    for k in KEEPS:
        t = time.perf_counter()
        pipe.prune_and_classify(out, PruneConfig(keep=k, tau=None, context_side=32))
        reprune.append(time.perf_counter() - t)
    return analyze, reprune, bundle_info(bundle)


def page_times(model: str | None, gallery: Path, n: int, workdir: Path) -> tuple[list[float], list[float]]:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.browser_util import AppServer, browser_missing, make_driver

    why = browser_missing()
    if why:
        raise SystemExit(f"page_latency needs Debian Chromium: {why}")
    model_dir = Path(model) if model else ROOT / "assets" / "default_model"
    app = AppServer(model_dir, workdir, gallery=gallery)
    driver = None
    try:
        app.wait_ready(timeout=300)
        profile = workdir / "chrome-profile"
        profile.mkdir()
        driver = make_driver(profile, 1366, 768)
        driver.set_script_timeout(180)
        driver.get(app.url)

        def settle():
            time.sleep(0.3)
            deadline = time.monotonic() + 180
            while driver.execute_script(PENDING_JS) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.3)

        deadline = time.monotonic() + 60
        while len(driver.find_elements("css selector", "#example-gallery .thumbnail-item")) < N_PHANTOMS + n:
            if time.monotonic() > deadline:
                raise SystemExit("the gallery did not show the benchmark's studies")
            time.sleep(0.2)
        # a phantom first: the page, its fonts and plotly are loaded before anything is timed
        driver.execute_async_script(CLICK_JS, 0, "attention")
        settle()
        clicks = []
        for i in range(n):
            v = driver.execute_async_script(CLICK_JS, N_PHANTOMS + i, "attention")
            clicks.append(v / 1000.0)
            settle()
        slider = []
        for k in KEEPS:
            v = driver.execute_async_script(CLICK_JS, None, "kept", k)
            slider.append(v / 1000.0)
            settle()
        return clicks, slider
    finally:
        if driver is not None:
            driver.quit()
        app.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 studies instead of 8")
    ap.add_argument("--n", type=int, default=None, help="studies clicked (default 8, quick 4)")
    ap.add_argument("--model", default=None, help="model bundle (default assets/default_model)")
    args = ap.parse_args()
    n = args.n or (4 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="neural-page-latency-"))
    try:
        gallery = work / "gallery"
        gallery.mkdir()
        items = studies(n, gallery)
        analyze, reprune, binfo = pipeline_times(args.model, items)
        clicks, slider = page_times(args.model, gallery, n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c, a, s, r = stats(clicks), stats(analyze), stats(slider), stats(reprune)
    rows = [
        ["gallery click -> heatmap visible (page)", ms(c["median"]), ms(c["p90"]),
         f"pipeline analyze {ms(a['median'])}", f"{c['median'] / a['median']:.2f}x",
         "<= 1.5 s: " + ("met" if c["median"] <= 1.5 else "NOT met")],
        ["keep slider -> new overlay (page)", ms(s["median"]), ms(s["p90"]),
         f"pipeline re-prune {ms(r['median'])}", f"{s['median'] / r['median']:.2f}x",
         "<= 0.5 s: " + ("met" if s["median"] <= 0.5 else "NOT met")],
    ]
    print(table(rows, ["figure", "median", "p90", "baseline (same run)", "ratio", "target"]))
    print(f"studies: {n} ({items[0][0].suffix} files); machine: {machine()}")
    path = write_json("page_latency", {"machine": machine(), "bundle": binfo, "n_studies": n,
                                       "click_s": clicks, "slider_s": slider, "pipeline_analyze_s": analyze,
                                       "pipeline_reprune_s": reprune, "click": c, "slider": s,
                                       "pipeline_analyze": a, "pipeline_reprune": r})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
