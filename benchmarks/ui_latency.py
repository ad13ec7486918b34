"""Benchmark: the review app as a radiologist feels it, in Debian's headless Chromium driven by
Playwright, against the previous design's per-slice cost measured in the same run (the machines
are shared and noisy).

The demo study (`aidx serve --demo`'s: 300 x 512², three nodules) is indexed into a store as
the DICOM node would, and one inference job runs on it with the shipped default model
(aidx.worker.Worker, as `aidx serve` does). The review app (ui.web.UiServer, on a free port,
in this process) serves it to a radiologist at 1366x768:

- study open, with nothing prepared (the click reads the series) and prepared at result time
  (the server opens new results ahead, ui.web PREPARE_INTERVAL_S; a new browser): from the
  click on the worklist row (its pointerdown timestamp) to the first slice painted on the
  viewer's canvas;
- slice step: ArrowDown, from the keydown's timestamp to the canvas painted with the next slice,
  --steps times right after the study opened (slices may still be on their way) and again once
  the page holds the whole series (its background prefetch done);
- window/level drag: a left-drag in the page, a mouse move every 8 ms (125 Hz, as a mouse
  reports) for --drag-ms; canvas updates per second while the button is held, and the time of
  one repaint (windowing 512² int16 in the page);
- a scripted review: open the study, decide four findings from the keyboard (n, then a or x),
  sign (Shift+S), until the "Signed" message: the wall time (machine time, no reading).

Baseline, in the same page: the previous design's scroll step, a fetch of the server-rendered
PNG (/viewer/slice.png, the route still served) and its decode, for the same slices; and the
server's render_png of a slice in this process.

Goals (issue 16): study open <= 1.5 s, slice step p95 <= 50 ms, window/level drag >= 30 updates
per second, scripted review <= 20 s.

Usage: python benchmarks/ui_latency.py [--steps 40] [--drag-ms 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from playwright.sync_api import expect, sync_playwright

_HERE = Path(__file__).resolve().parent  # this folder's inference.py would shadow `inference`
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from aidx.config import AidxConfig, load_config
from aidx.demo import write_demo_study
from aidx.pipeline.worker import Worker
from aidx.store.store import Store
from dicom_node.parse import read_file
from ui import viewer_session
from ui.accounts import Accounts
from ui.viewer import WINDOW_PRESETS
from ui.viewer_session import study_view
from ui.web import UiServer

GOALS = {"open_s": 1.5, "step_p95_ms": 50.0, "drag_per_s": 30.0, "review_s": 20.0}
USER, PASSWORD = "reader", "benchmark reader password 1"
CHROMIUM_FLAGS = [  # as tests/ui/test_review_e2e.py
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1366, "height": 768}

# Armed before an action: the clock starts at the next keydown/pointerdown (the event's own
# timestamp, before any handler ran) and stops at the viewer's next paint (window.aidxViewer,
# ui/viewer.js) showing ``want`` (a plane:index, or any picture when empty).
ARM_JS = """([want, timeoutMs]) => {
  const stats = window.aidxViewer || { paints: 0 };
  const before = stats.paints || 0;
  let start = null;
  const onStart = (e) => {
    if (start === null) start = e.timeStamp;
    window.removeEventListener('keydown', onStart, true);
    window.removeEventListener('pointerdown', onStart, true);
  };
  window.addEventListener('keydown', onStart, true);
  window.addEventListener('pointerdown', onStart, true);
  window.__aidxShown = new Promise((resolve, reject) => {
    const limit = performance.now() + timeoutMs;
    const check = () => {
      const s = window.aidxViewer;
      if (s && s.paints > before && start !== null && (!want || s.shown === want)) {
        resolve(s.at - start);
      } else if (performance.now() > limit) {
        reject(new Error('no paint of ' + want + ' in ' + timeoutMs + ' ms'));
      } else requestAnimationFrame(check);
    };
    requestAnimationFrame(check);
  });
}"""

# The previous design's step: the server's rendering of a slice, fetched and decoded.
PNG_STEP_JS = """async ([review, positions]) => {
  const out = [];
  for (const pos of positions) {
    const t = performance.now();
    const r = await fetch(`/viewer/slice.png?review=${review}&pos=${pos}&w=1500&l=-600&ov=1` +
      `&rev=${Math.random()}`, { credentials: 'same-origin' });
    await createImageBitmap(await r.blob());
    out.push(performance.now() - t);
  }
  return out;
}"""


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def prepare(root: Path) -> tuple[AidxConfig, Store, str]:
    """The demo study, indexed and run with the shipped default model, and a radiologist."""
    config = load_config(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "inference.providers": ["CPUExecutionProvider"],
            "ui.port": 0,
            "demo.output": str(root / "study"),
        },
    )
    dicom_dir = Path(config.demo_output()) / "dicom"
    write_demo_study(config)  # what `aidx serve --demo` sends
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.for_config(config)
    study_uid = ""
    for path in sorted(dicom_dir.glob("*.dcm")):
        record = replace(read_file(path.read_bytes(), "PACS"), path=str(path))
        store.index_instance(record, time.time() - 10.0, 1.0)
        study_uid = record.study_uid
    store.complete_study(study_uid, time.time())
    start = time.perf_counter()
    if not Worker(config, store).run_once():
        raise RuntimeError("the worker found no job for the phantom study")
    print(f"inference (shipped default model): {time.perf_counter() - start:.1f} s")
    Accounts(store).add_user(
        USER, PASSWORD, role="radiologist", display_name="Reader^Bench", organisation="Bench"
    )
    return config, store, study_uid


def timed(page: Any, act: Any, want: str = "") -> float:
    """Milliseconds from the action's input event to the paint of ``want``."""
    page.evaluate(ARM_JS, [want, TIMEOUT_MS])
    act()
    return float(page.evaluate("() => window.__aidxShown"))


def pos(page: Any) -> int:
    return int(page.locator("#aidx-viewer").get_attribute("data-pos") or "0")


def signed_in_page(browser: Any, url: str) -> Any:
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_url(re.compile(r".*/login.*"))
    page.fill("#username", USER)
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/app/en/.*"))
    expect(page.locator("#worklist div[role=row]").first).to_contain_text("lung-nodule")
    return page


def open_study(page: Any) -> float:
    row = page.locator("#worklist div[role=row]").first.locator("[role=gridcell]").nth(3)
    return timed(page, row.click) / 1000.0


def steps(page: Any, count: int) -> list[float]:
    page.locator("#aidx-canvas").hover()
    out = []
    for _ in range(count):
        want = f"axial:{pos(page)}"  # the next slice's 0-based position is the 1-based now
        out.append(timed(page, lambda: page.keyboard.press("ArrowDown"), want))
    return out


# A left-drag as a mouse sends it (a move every 8 ms, 125 Hz) for ``ms`` milliseconds, in the
# page: the canvas updates it caused per second, and their repaint times.
DRAG_JS = """async (ms) => {
  const c = document.getElementById('aidx-canvas'), r = c.getBoundingClientRect();
  const x = r.left + r.width / 2, y = r.top + r.height / 2;
  const s = window.aidxViewer, paints = s.paints, renders = s.renderMs.length;
  const at = (type, dx, dy, buttons) => new MouseEvent(type, { bubbles: true, button: 0,
    buttons, clientX: x + dx, clientY: y + dy });
  c.dispatchEvent(at('mousedown', 0, 0, 1));
  const start = performance.now();
  let i = 0;
  await new Promise((done) => {
    const timer = setInterval(() => {
      i += 1;
      document.dispatchEvent(at('mousemove', -(i % 200), i % 50, 1));
      if (performance.now() - start >= ms) { clearInterval(timer); done(); }
    }, 8);
  });
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const seconds = (performance.now() - start) / 1000;
  document.dispatchEvent(at('mouseup', 0, 0, 0));
  return [(s.paints - paints) / seconds, s.renderMs.slice(renders), i / seconds];
}"""


def drag(page: Any, ms: int) -> tuple[float, list[float], float]:
    """Canvas updates per second during a left-drag of ``ms`` milliseconds at 125 Hz, the
    repaint times (ms), and the mouse events per second actually sent."""
    rate, repaint, sent = page.evaluate(DRAG_JS, ms)
    return float(rate), [float(v) for v in repaint], float(sent)


def scripted_review(page: Any) -> float:
    start = time.perf_counter()
    open_study(page)
    count = page.locator("#findings div[role=row]").count()
    for n in range(min(count, 4)):
        if n:
            page.locator("body").press("n")
        key = page.locator("#findings div[role=row]").nth(n).locator("[role=gridcell]").first
        expect(page.locator("#selected")).to_contain_text(key.inner_text())
        page.locator("body").press("a" if n % 2 == 0 else "x")
        expect(page.locator("#message")).to_contain_text("accepted" if n % 2 == 0 else "rejected")
    for n in range(4, count):  # a fifth and more: rejected the same way (sign needs all)
        page.locator("body").press("n")
        key = page.locator("#findings div[role=row]").nth(n).locator("[role=gridcell]").first
        expect(page.locator("#selected")).to_contain_text(key.inner_text())
        page.locator("body").press("x")
        expect(page.locator("#message")).to_contain_text(f"{key.inner_text()} rejected")
    page.locator("body").press("Shift+S")
    expect(page.locator("#message")).to_contain_text("Signed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per series")
    parser.add_argument("--drag-ms", type=int, default=2000, help="length of the W/L drag")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    med = statistics.median
    prewarm_default = viewer_session.PREWARM
    with tempfile.TemporaryDirectory(prefix="aidx-ui-latency-bench-") as tmp:
        config, store, study_uid = prepare(Path(tmp))
        server = UiServer(config, store)
        server.start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS
                )
                print(f"browser: Chromium {browser.version}, headless, 1366x768")
                viewer_session.PREWARM = 0  # nothing prepared: the click reads the series
                page = signed_in_page(browser, server.url)
                cold = open_study(page)
                early = steps(page, args.steps)
                count = int(page.locator("#aidx-scroll").get_attribute("max") or "0")
                page.wait_for_function(f"() => window.aidxViewer.cached >= {count}")
                page.keyboard.press("Home")
                late = steps(page, args.steps)
                rate, repaint, sent = drag(page, args.drag_ms)
                (row,) = [w for w in server.ctx.reviews.worklist() if w.study_uid == study_uid]
                positions = list(range(pos(page), pos(page) + args.steps))
                png = page.evaluate(PNG_STEP_JS, [row.review_id, positions])
                # Prepared at result time, as the server does (ui.web, PREPARE_INTERVAL_S):
                # the view opened ahead, then a new browser opens the study.
                viewer_session.PREWARM = prewarm_default
                viewer_session._cache.clear()
                viewer_session.prewarm(server.ctx, [row.review_id])
                viewer_session._prewarmer.submit(lambda: None).result()
                second = signed_in_page(browser, server.url)
                warm = open_study(second)
                third = signed_in_page(browser, server.url)
                review_s = scripted_review(third)
                browser.close()
            view = study_view(server.ctx, row.review_id)
            window, level = WINDOW_PRESETS["lung"]
            render = []
            for k in positions:
                t = time.perf_counter()
                view.render_png(view.slice_at(k), window, level)
                render.append((time.perf_counter() - t) * 1000.0)
        finally:
            server.stop()
            store.close()

    print(f"study: the demo study, 300 x 512², {row.finding_count} findings, lung window")
    print("                                          median      p95")
    table = [
        ("slice step, right after open (ms)", early),
        ("slice step, series in the page (ms)", late),
        ("W/L repaint in the page (ms)", repaint),
        ("baseline: fetch+decode slice.png (ms)", png),
        ("baseline: server render_png (ms)", render),
    ]
    for name, values in table:
        print(f"  {name:<39} {med(values):7.1f} {p95(values):8.1f}")
    print(f"  study open, nothing prepared (s)        {cold:7.2f}")
    print(f"  study open, prepared at result time (s) {warm:7.2f}")
    print(f"  W/L drag (canvas updates per second)    {rate:7.1f}  ({sent:.0f} mouse moves/s)")
    print(f"  scripted review: open, 4 decisions, sign (s) {review_s:5.1f}")
    print(
        f"step vs baseline (fetch+decode PNG): median {med(late) / med(png):.2f}x, "
        f"p95 {p95(late) / p95(png):.2f}x"
    )
    checks = [
        ("study open <= 1.5 s, nothing prepared", cold <= GOALS["open_s"]),
        ("study open <= 1.5 s, prepared at result time", warm <= GOALS["open_s"]),
        ("slice step p95 <= 50 ms (after open)", p95(early) <= GOALS["step_p95_ms"]),
        ("slice step p95 <= 50 ms (series in page)", p95(late) <= GOALS["step_p95_ms"]),
        ("W/L drag >= 30 updates/s", rate >= GOALS["drag_per_s"]),
        ("scripted review <= 20 s", review_s <= GOALS["review_s"]),
    ]
    print("slice steps right after open, in order (ms):", " ".join(f"{v:.0f}" for v in early))
    for name, ok in checks:
        print(f"  {'met ' if ok else 'MISS'} {name}")


if __name__ == "__main__":
    main()
