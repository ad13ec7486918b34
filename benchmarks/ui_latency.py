"""Benchmark: the review app's scrolling latency as a radiologist feels it, in Debian's headless
Chromium driven by Playwright, against the server-side render of the same slices in the same run
(the machines are shared and noisy).

A 300 x 512² phantom CT is indexed into a store as the DICOM node would, and one inference job
runs on it with the shipped default model (aidx.worker.Worker, as `aidx serve` does). The review
app (ui.web.UiServer, on a free port, in this process) serves it; a radiologist logs in, opens
the study from the worklist, then:

- presses ArrowDown, and clicks the ▼ button (#slice-next): --steps times each after --warmup
  steps, from the key event (keydown / pointerdown, the event's own timestamp) to the slice's
  <img> having a new src and its ``load`` event fired, timed in the page (performance.now).
  Both go through the page's scrolling script: the slice comes from /viewer/slice.png, and the
  next three were prefetched while the previous step was shown (as in continuous scrolling);
- changes the window preset to mediastinum (and back to lung), the same way.

Baseline, after the browser is done: ``StudyView.render_png`` of the timed slices on a freshly
opened view (first visits, as the browser's; then warm), lung window, the first finding selected
as in the browser: the picture the browser waits for, without Gradio and HTTP; and the handler's
``viewer_session.render_slice`` (RGB) on the server's cached view, and Gradio's own PNG
encoding of its output (gr.Image(format="png") encodes at zlib's default level).

Target (issue 7): <= 100 ms server-side per 512² slice with overlays; end to end printed beside.

Usage: python benchmarks/ui_latency.py [--steps 40] [--warmup 5] [--repeats 1] [--presets 5]
       [--slices 300]
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
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from gradio.processing_utils import encode_pil_to_bytes
from PIL import Image
from playwright.sync_api import expect, sync_playwright

_HERE = Path(__file__).resolve().parent  # this folder's inference.py would shadow `inference`
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from aidx.config import AidxConfig, load_config
from aidx.store import Store
from aidx.worker import Worker
from dicom_node.parse import read_file
from training.phantom import PhantomOptions, generate
from ui.accounts import Accounts
from ui.viewer import WINDOW_PRESETS, StudyView
from ui.viewer_session import ViewerState, render_slice
from ui.web import UiServer

TARGET_MS = 100.0
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

# Armed before the action: the clock starts at the first keydown/pointerdown after this (the
# event's timestamp, before any handler ran) and stops when the <img> in #slice-image has a src
# other than the current one and has fired `load` (Gradio may swap the element or its src).
ARM_JS = """(timeoutMs) => {
  const root = document.querySelector('#slice-image');
  const before = root.querySelector('img')?.src ?? null;
  let start = null;
  const onStart = (e) => {
    if (start === null) start = e.timeStamp;
    window.removeEventListener('keydown', onStart, true);
    window.removeEventListener('pointerdown', onStart, true);
  };
  window.addEventListener('keydown', onStart, true);
  window.addEventListener('pointerdown', onStart, true);
  window.__aidxShown = new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(`no new slice image in ${timeoutMs} ms`)), timeoutMs);
    const done = () => start === null ? reject(new Error('no key or pointer event seen'))
                                      : resolve(performance.now() - start);
    const check = () => {
      const img = root.querySelector('img');
      if (!img || !img.src || img.src === before) return;
      observer.disconnect();
      if (img.complete && img.naturalWidth > 0) done();
      else img.addEventListener('load', done, {once: true});
    };
    const observer = new MutationObserver(check);
    observer.observe(root, {subtree: true, childList: true, attributeFilter: ['src']});
  });
}"""


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def prepare(root: Path, slices: int) -> tuple[AidxConfig, Store, str]:
    """The phantom, indexed and run with the shipped default model, and a radiologist."""
    phantom = generate(root / "study", PhantomOptions(seed=42, slices=slices, nodules=3))
    config = load_config(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "inference.providers": ["CPUExecutionProvider"],
            "ui.port": 0,
        },
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{config.data_dir / 'aidx.db'}")
    study_uid = ""
    for path in sorted(Path(phantom.dicom_dir).glob("*.dcm")):
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


def shown_ms(page: Any, act: Callable[[], None]) -> float:
    page.evaluate(ARM_JS, TIMEOUT_MS)
    act()
    return float(page.evaluate("() => window.__aidxShown"))


def current_slice(page: Any) -> int:
    return int(page.locator("#slice input[type=number]").input_value())


def series(
    page: Any, act: Callable[[], None], warmup: int, steps: int, visited: list[int]
) -> list[float]:
    """``warmup`` + ``steps`` one-slice steps down, each waited for; the last ``steps`` times.
    Adds the timed steps' slices (0-based) to ``visited``."""
    first = current_slice(page)
    times = [shown_ms(page, act) for _ in range(warmup + steps)][warmup:]
    expect(page.locator("#slice input[type=number]")).to_have_value(str(first + warmup + steps))
    visited.extend(range(first + warmup, first + warmup + steps))
    return times


def make_room(page: Any, need: int, count: int) -> None:
    """Scroll up (ArrowUp, each step waited for) until ``need`` slices lie below."""
    # Keys to the page, not to the preset radio clicked before (ui/app.py's KEYBOARD_JS).
    page.evaluate("() => document.activeElement?.blur()")
    while current_slice(page) + need > count and current_slice(page) > 1:
        shown_ms(page, lambda: page.keyboard.press("ArrowUp"))


def browser_run(
    url: str, study_uid: str, args: argparse.Namespace, visited: list[int]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"key": [], "button": [], "mediastinum": [], "lung": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        print(f"browser: Chromium {browser.version}, headless, 1600x1100")
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_url(re.compile(r".*/login.*"))
        page.fill("#username", USER)
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(re.compile(r".*/app/en/.*"))
        rows = page.locator("#worklist div[role=row]")
        expect(rows.first).to_contain_text("lung-nodule")
        rows.first.locator("[role=gridcell]").nth(3).click()
        expect(page.locator("#viewer-status")).to_contain_text(study_uid)
        expect(page.locator("#slice-image img")).to_be_visible()
        count = int(page.locator("#slice input[type=number]").get_attribute("max") or "0")
        page.locator("#slice-image").hover()
        preset = page.locator("#preset")
        for _ in range(args.repeats):
            make_room(page, 2 * (args.warmup + args.steps), count)
            key = partial(page.keyboard.press, "ArrowDown")
            times["key"] += series(page, key, args.warmup, args.steps, visited)
            button = partial(page.click, "#slice-next")
            times["button"] += series(page, button, args.warmup, args.steps, visited)
            for _ in range(args.presets):
                for name in ("mediastinum", "lung"):
                    times[name].append(shown_ms(page, preset.get_by_text(name).click))
            expect(page.locator("#window-width input")).to_have_value("1500")
        browser.close()
    return times


def ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def server_run(server: UiServer, study_uid: str, slices: list[int]) -> dict[str, list[float]]:
    """The browser's timed slices rendered in this process: ``render_png`` on a freshly opened
    view (first visits, as the browser's were; then again, warm) and the handler's
    ``render_slice`` on the server's cached view, and Gradio's PNG encoding of its picture."""
    ctx = server.ctx
    (row,) = [w for w in ctx.reviews.worklist() if w.study_uid == study_uid]
    case = ctx.reviews.case(row.review_id)
    files = [r["path"] for r in ctx.store.study_instances(study_uid)]
    view = StudyView.open(files, case.findings_path, case.seg_path)
    found = ctx.reviews.findings(row.review_id)
    # The first finding selected, as ui.viewer_session.open_review leaves it in the browser.
    st = ViewerState(review_id=row.review_id, slice_count=view.slice_count)
    st.selected = found[0].key if found else None
    selected = found[0].ai.id if found and found[0].ai else None
    window, level = WINDOW_PRESETS["lung"]
    print(f"AI result: {row.model}, {row.finding_count} findings")
    times: dict[str, list[float]] = {}
    for name in ("cold", "warm"):
        times[name] = [
            ms(partial(view.render_png, k, window, level, selected_finding=selected))
            for k in slices
        ]
    times["render_slice"], times["gradio_png"] = [], []
    for k in slices:
        st.slice = k
        times["render_slice"].append(ms(lambda: render_slice(ctx, st)))
        rgb = render_slice(ctx, st)
        assert rgb is not None, "no study open in the benchmark's viewer state"
        times["gradio_png"].append(ms(partial(encode_pil_to_bytes, Image.fromarray(rgb), "png")))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per series")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each")
    parser.add_argument("--repeats", type=int, default=1, help="times the series are repeated")
    parser.add_argument("--presets", type=int, default=5, help="preset changes per repeat")
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="aidx-ui-latency-bench-") as tmp:
        config, store, study_uid = prepare(Path(tmp), args.slices)
        server = UiServer(config, store)
        server.start()
        try:
            visited: list[int] = []
            browser = browser_run(server.url, study_uid, args, visited)
            server_times = server_run(server, study_uid, visited)
        finally:
            server.stop()
            store.close()

    med = statistics.median
    print(
        f"study: {args.slices} x 512², lung window, overlays on, first finding selected; "
        f"{len(browser['key'])} steps per way after {args.warmup} warm-up each "
        f"({args.repeats} repeat(s)), {len(browser['mediastinum'])} preset changes each way"
    )
    print("ms                                   median     p95")
    rows = [
        ("browser: ArrowDown -> shown", browser["key"]),
        ("browser: click ▼ -> shown", browser["button"]),
        ("browser: preset mediastinum", browser["mediastinum"]),
        ("browser: preset lung", browser["lung"]),
        ("server: render_png (baseline)", server_times["cold"]),
        ("server: render_png, warm", server_times["warm"]),
        ("server: render_slice (RGB), warm", server_times["render_slice"]),
        ("server: Gradio's own PNG (unused)", server_times["gradio_png"]),
    ]
    for name, values in rows:
        print(f"  {name:<33} {med(values):7.1f} {p95(values):7.1f}")
    base = med(server_times["cold"])
    print(
        f"browser vs server render_png: ArrowDown {med(browser['key']) / base:.1f}x, "
        f"click {med(browser['button']) / base:.1f}x, "
        f"mediastinum {med(browser['mediastinum']) / base:.1f}x"
    )
    print(
        f"target <= {TARGET_MS:.0f} ms server-side per 512² slice with overlays: server p95 "
        f"{p95(server_times['cold']):.1f} ms; end to end (ArrowDown) median "
        f"{med(browser['key']):.1f} ms, p95 {p95(browser['key']):.1f} ms"
    )


if __name__ == "__main__":
    main()
