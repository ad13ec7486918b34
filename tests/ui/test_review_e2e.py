"""The review app end to end, as a radiologist uses it: `aidx serve --demo` (what `make run`
does) with Orthanc as the PACS, driven in Debian's headless Chromium by Playwright.

Log in with the demo account the server prints, open the demo study from the worklist, scroll
(keyboard and buttons), change the window, accept one finding, reject the others (one with a
reason), add a missed one by clicking the image, sign. Then: the signed SR is in the outbox and
in Orthanc, dciodvfy finds no error in it, highdicom reads the decisions back, the audit log
holds each step, and the dashboard and the admin-only audit tab behave. Screenshots of each step
are kept in test-artifacts/ui/ (CI keeps that folder).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
import yaml
from sqlalchemy import select

from aidx.store.schema import reviews
from aidx.store.store import Store
from tests.conftest import REPO, require_tool
from tests.inference.results_case import dciodvfy_errors
from tests.peers import LOOPBACK, Orthanc, free_port, log_tail, poll_until, stop_process
from tests.pipeline.harness import downloads, study_series
from ui.accounts import Accounts
from ui.audit import Audit
from ui.signed_sr import DECISION

pytestmark = pytest.mark.external

AIDX = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "aidx"
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RESULT_DEADLINE_S = 240.0  # demo quiet period + inference of 300 x 512² on a loaded 2-core box
UI_TIMEOUT_MS = 60_000


@dataclass
class Served:
    url: str
    password: str
    data_dir: Path
    log_path: Path
    orthanc: Orthanc
    study_uid: str


def _aidx_binary() -> str:
    import shutil
    import sys

    found = shutil.which("aidx", path=str(Path(sys.executable).parent))
    assert found, "the aidx console script is not installed in this environment"
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_tool("chromium", "chromium")
    root = tmp_path_factory.mktemp("review-e2e")
    node_port, ui_port = free_port(), free_port()
    with Orthanc(root / "orthanc", modalities={"AIDX": ("AIDX", LOOPBACK, node_port)}) as pacs:
        config = {
            "node": {"ae_title": "AIDX", "port": node_port, "min_free_disk_mb": 0},
            "destinations": {
                "PACS": {"ae_title": "ORTHANC", "host": LOOPBACK, "port": pacs.dicom_port}
            },
            "outbox": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "poll_interval_s": 0.3},
            "inference": {"providers": ["CPUExecutionProvider"]},
            "metrics": {"port": 0},
            "ui": {"enabled": True, "port": ui_port},
        }
        config_path = root / "aidx.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        data_dir = root / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
        log_path = root / "serve.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    _aidx_binary(),
                    "--config",
                    str(config_path),
                    "--data-dir",
                    str(data_dir),
                    "serve",
                    "--demo",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            found: dict[str, str] = {}

            def printed() -> bool:
                text = log_path.read_text(encoding="utf-8", errors="replace")
                url = re.search(r"aidx review app: (http://\S+)", text)
                password = re.search(r"with password: (\S+)", text)
                if url and password:
                    found.update(url=url.group(1), password=password.group(1))
                return bool(found)

            poll_until(
                printed,
                60.0,
                "the review app's address and the demo login",
                process=process,
                log_path=log_path,
            )
            store = Store(f"sqlite:///{data_dir / 'aidx.db'}", root=data_dir)
            uid: list[str] = []

            def result_ready() -> bool:
                with store.engine.connect() as conn:
                    row = conn.exec_driver_sql(
                        "SELECT study_uid FROM jobs WHERE state IN ('results_ready', 'sent')"
                    ).first()
                if row:
                    uid.append(str(row[0]))
                return bool(row)

            poll_until(
                result_ready,
                RESULT_DEADLINE_S,
                "the demo study's AI result",
                process=process,
                log_path=log_path,
            )
            store.close()
            yield Served(found["url"], found["password"], data_dir, log_path, pacs, uid[0])
        finally:
            stop_process(process)
    assert process.returncode == 0, log_tail(log_path)
    # Stopped with the review app's pages served: no traceback (a browser's open connection
    # is closed with one line, ui.web._ShutdownCancellation).
    assert "Traceback" not in log_path.read_text(encoding="utf-8", errors="replace")


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _browser() -> Any:
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _pos(page: Any) -> int:
    """The axial slice on screen (1-based scroll position), as the viewer script shows it."""
    return int(page.locator("#aidx-viewer").get_attribute("data-pos") or "0")


def _canvas(page: Any) -> tuple[float, float]:
    """Mean and spread of the grey values in the middle of the viewer's canvas."""
    values = page.evaluate(
        """() => {
          const c = document.getElementById('aidx-canvas');
          const d = c.getContext('2d').getImageData(c.width / 4, c.height / 4, c.width / 2,
            c.height / 2).data;
          let s = 0, s2 = 0, n = 0;
          for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; n++; }
          return [s / n, Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0))];
        }"""
    )
    return (round(float(values[0]), 1), round(float(values[1]), 1))


def _login(page: Any, url: str, user: str, password: str) -> None:
    page.goto(url)
    page.wait_for_url(re.compile(r".*/login.*"))
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/app/en/.*"))


def test_radiologist_reviews_and_signs_the_demo_study(served: Served) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # as long as the page's own waits (a loaded box)
    with _browser() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(served.url)
        expect(page.locator("#password")).to_be_visible()
        _shot(page, "01-login")
        _login(page, served.url, "demo", served.password)

        # Worklist: the demo study, new, with its findings.
        rows = page.locator("#worklist div[role=row]")  # the virtual table's data rows
        expect(rows.first).to_contain_text("lung-nodule")
        expect(rows.first).to_contain_text("new")
        _shot(page, "02-worklist")
        rows.first.locator("[role=gridcell]").nth(3).click()

        # Viewer: the study opens on the first finding's key slice, drawn by the page itself.
        viewer = page.locator("#aidx-viewer")
        expect(page.locator("#viewer-status")).to_contain_text(served.study_uid)
        page.wait_for_function("window.aidxViewer && window.aidxViewer.paints > 0")
        start = _pos(page)
        assert start > 1
        findings = page.locator("#findings div[role=row]")
        count = findings.count()
        assert count >= 2, f"the demo study needs two findings for this test, got {count}"
        # Images are numbered as in the PACS (Instance Number): the first finding's image.
        info = page.locator("#aidx-slice-info")
        image_number = int(findings.first.locator("[role=gridcell]").nth(5).inner_text())
        expect(info).to_contain_text(f"Image {image_number} · {start} of ")
        lung = _canvas(page)
        assert lung[1] > 20, lung  # a CT slice on the canvas, not a blank
        # The corners say whose images these are, as in a PACS viewer.
        expect(page.locator("#aidx-tl")).to_contain_text("DEMO, CHEST PHANTOM")
        expect(page.locator("#aidx-tl")).to_contain_text("1960-01-01")
        expect(page.locator("#aidx-tr")).to_contain_text("Acc.")
        expect(page.locator("#aidx-br")).to_contain_text("W 1500  L -600")
        _shot(page, "03-viewer")
        # A refused action is a message beside the controls; the viewer stays as it was.
        page.click("#sign")
        expect(page.locator("#message")).to_contain_text("undecided")
        expect(page.locator("#aidx-canvas")).to_be_visible()
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        expect(page.locator("#viewer-status")).to_contain_text("DEMO, CHEST PHANTOM")
        # The reading screens: image, scroll bar, window tools, decisions and Sign in view with
        # no page scrolling.
        for width, height in ((1366, 768), (1920, 1080)):
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_function(
                "h => document.getElementById('aidx-scrollbar').getBoundingClientRect().bottom"
                " <= h && document.scrollingElement.scrollHeight <= h + 1",
                arg=height,
            )
            for element in ("#aidx-toolbar", "#aidx-canvas", "#aidx-scroll", "#accept", "#sign"):
                box = page.locator(element).bounding_box()
                assert box is not None and box["y"] >= 0, element
                assert box["y"] + box["height"] <= height and box["x"] + box["width"] <= width
            _shot(page, f"03-viewer-{width}x{height}")
        page.set_viewport_size({"width": 1600, "height": 1000})

        # Scroll: keyboard (focus on the page, not in a field), the buttons, the wheel.
        canvas = page.locator("#aidx-canvas")
        canvas.hover()
        page.locator("body").press("ArrowDown")
        expect(viewer).to_have_attribute("data-pos", str(start + 1))
        expect(info).to_contain_text(f"Image {image_number + 1} · {start + 1} of ")
        page.locator("body").press("ArrowDown")
        expect(viewer).to_have_attribute("data-pos", str(start + 2))
        page.click("#aidx-scrollbar [data-action=prev]")
        expect(viewer).to_have_attribute("data-pos", str(start + 1))
        canvas.hover()
        page.mouse.wheel(0, 120)  # the pointer is over the image: one slice on
        expect(viewer).to_have_attribute("data-pos", str(start + 2))
        page.mouse.wheel(0, -120)
        expect(viewer).to_have_attribute("data-pos", str(start + 1))
        # A click (no drag) marks the slice on screen, at once after a step.
        page.locator("body").press("ArrowDown")
        canvas.click()
        expect(page.locator("#clicked-point")).to_contain_text(f"image {image_number + 2},")
        # Taps 150-200 ms apart, as a reader scrolls: every step counts and none goes back.
        seen = [_pos(page)]
        for i in range(10):
            page.locator("body").press("ArrowDown" if i < 6 else "ArrowUp")
            page.wait_for_timeout(150 + 10 * (i % 6))  # the reader's pace, not a wait for state
            seen.append(_pos(page))
        assert seen == [seen[0] + n for n in (0, 1, 2, 3, 4, 5, 6, 5, 4, 3, 2)], seen
        canvas.hover()
        for _ in range(5):
            page.mouse.wheel(0, 120)
            page.wait_for_timeout(170)
            seen.append(_pos(page))
        assert seen[-5:] == [seen[0] + n for n in (3, 4, 5, 6, 7)], seen
        canvas.click()
        expect(page.locator("#clicked-point")).to_contain_text(f"image {image_number + 9},")
        page.locator("body").press("PageUp")  # ten at a time
        expect(viewer).to_have_attribute("data-pos", str(start - 1))
        page.locator("body").press("PageDown")
        expect(viewer).to_have_attribute("data-pos", str(start + 9))
        for _ in range(7):
            page.locator("body").press("ArrowUp")
        expect(viewer).to_have_attribute("data-pos", str(start + 2))
        pixels = served.url + "viewer/pixels?review={}&plane=axial&index=0"
        assert page.request.get(pixels.format(1)).status == 200
        assert page.request.get(pixels.format(999)).status == 404

        # Window: number keys pick presets; a left-drag windows continuously in the page; a
        # typed window (Enter) is "manual"; r resets.
        page.locator("body").press("2")
        expect(viewer).to_have_attribute("data-ww", "350")
        expect(viewer).to_have_attribute("data-wl", "50")
        assert _canvas(page) != lung
        page.locator("body").press("1")
        expect(viewer).to_have_attribute("data-ww", "1500")
        box = canvas.bounding_box()
        assert box is not None
        middle = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        paints = page.evaluate("window.aidxViewer.paints")
        page.mouse.move(*middle)
        page.mouse.down()
        page.mouse.move(middle[0] - 100, middle[1] + 40, steps=10)
        # the window follows the mouse while the button is held, not at its release
        expect(viewer).to_have_attribute("data-preset", "manual")
        page.wait_for_function(f"window.aidxViewer.paints > {paints}")
        narrower = int(viewer.get_attribute("data-ww") or "0")
        assert 1 <= narrower < 1500 and int(viewer.get_attribute("data-wl") or "0") > -600
        page.mouse.up()
        # a drag is no click: the marked point stays where the last click put it
        expect(page.locator("#clicked-point")).to_contain_text(f"image {image_number + 9},")
        page.fill("#aidx-ww", "800")
        page.press("#aidx-ww", "Enter")
        expect(viewer).to_have_attribute("data-ww", "800")
        expect(page.locator("#aidx-br")).to_contain_text("W 800")
        page.fill("#aidx-ww", "0")
        page.press("#aidx-ww", "Enter")
        expect(page.locator("#aidx-note")).to_contain_text("at least 1 HU")
        expect(viewer).to_have_attribute("data-ww", "800")
        # Zoom (right-drag) and pan (middle-drag), then reset.
        page.mouse.move(*middle)
        page.mouse.down(button="right")
        page.mouse.move(middle[0], middle[1] - 120, steps=6)
        page.mouse.up(button="right")
        assert int(viewer.get_attribute("data-zoom") or "0") > 150
        page.mouse.move(*middle)  # no button held: nothing moves
        page.mouse.down(button="middle")
        page.mouse.move(middle[0] + 60, middle[1] + 30, steps=6)
        page.mouse.up(button="middle")
        expect(viewer).to_have_attribute("data-pan", "60,30")
        _shot(page, "04-window-zoom")
        page.locator("body").press("r")
        expect(viewer).to_have_attribute("data-zoom", "100")
        expect(viewer).to_have_attribute("data-pan", "0,0")
        expect(viewer).to_have_attribute("data-ww", "1500")
        # Reformats: coronal and sagittal through the selected finding, then back to axial.
        page.locator("body").press("v")
        expect(viewer).to_have_attribute("data-plane", "coronal")
        expect(info).to_contain_text("Coronal")
        page.wait_for_function("window.aidxViewer.shown.startsWith('coronal:')")
        assert _canvas(page)[1] > 20
        _shot(page, "04-coronal")
        page.locator("body").press("v")
        expect(viewer).to_have_attribute("data-plane", "sagittal")
        page.wait_for_function("window.aidxViewer.shown.startsWith('sagittal:')")
        page.locator("body").press("v")
        expect(viewer).to_have_attribute("data-plane", "axial")
        expect(viewer).to_have_attribute("data-pos", str(start + 2))  # the axial place is kept

        # Review from the keyboard: n/p move between findings (the view follows), a accepts,
        # x rejects; the second rejection by the mouse, with a reason.
        keys = [findings.nth(n).locator("[role=gridcell]").first.inner_text() for n in range(count)]
        page.locator("body").press("n")
        expect(page.locator("#selected")).to_contain_text(keys[1])
        page.locator("body").press("p")
        expect(page.locator("#selected")).to_contain_text(keys[0])
        expect(viewer).to_have_attribute("data-pos", str(start))
        page.locator("body").press("a")
        expect(page.locator("#message")).to_contain_text(f"{keys[0]} accepted")
        for n in range(1, count):
            page.locator("body").press("n")
            expect(page.locator("#selected")).to_contain_text(keys[n])
            if n == 1:
                page.fill("#reason input", "vessel")
                page.click("#reject")
            else:
                page.locator("body").press("x")
            expect(page.locator("#message")).to_contain_text(f"{keys[n]} rejected")
        _shot(page, "05-decisions")

        # Add a missed finding: measure it with the caliper (m, then drag): the line's middle
        # becomes the marked point, its length the new finding's diameter.
        page.locator("body").press("m")
        expect(viewer).to_have_class(re.compile("aidx-measuring"))
        left = (box["x"] + box["width"] * 0.40, box["y"] + box["height"] * 0.45)
        page.mouse.move(*left)
        page.mouse.down()
        page.mouse.move(left[0] + 12, left[1] + 5, steps=4)
        page.mouse.up()
        expect(page.locator("#message")).to_contain_text("Measured")
        expect(page.locator("#clicked-point")).to_contain_text("mm")
        measured = float(page.locator("#new-diameter input").input_value())
        assert 2.0 < measured < 30.0, measured
        page.locator("body").press("Escape")
        page.click("#add")
        expect(page.locator("#message")).to_contain_text("added-1")
        expect(findings).to_have_count(count + 1)
        _shot(page, "06-added")

        # Sign from the keyboard (Shift+S); the decisions are then closed until re-opened.
        page.locator("body").press("Shift+S")
        expect(page.locator("#message")).to_contain_text("Signed")
        expect(page.locator("#viewer-status")).to_contain_text("signed")
        expect(page.locator("#accept")).to_be_disabled()
        expect(page.locator("#reopen")).to_be_enabled()
        _shot(page, "07-signed")

        # Dashboard.
        page.get_by_role("tab", name="Dashboard").click()
        page.click("#dashboard-refresh")
        expect(page.locator("#dashboard-summary")).to_contain_text("signed: 1")
        _shot(page, "08-dashboard")
        # A radiologist sees no audit tab, and the CSV route refuses them.
        expect(page.get_by_role("tab", name="Audit log")).to_have_count(0)
        assert page.request.get(served.url + "admin/audit.csv").status == 403
        browser.close()

    _check_signed_report(served, accepted=1, rejected=count - 1, added=1)


def _add_user(served: Served, name: str, role: str, language: str) -> None:
    added = subprocess.run(
        [
            _aidx_binary(),
            "--data-dir",
            str(served.data_dir),
            "users",
            "add",
            name,
            "--role",
            role,
            "--name",
            f"Test^{name}",
            "--language",
            language,
            "--password-stdin",
        ],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("AIDX_")},
    )
    assert added.returncode == 0, added.stderr


def test_admin_reads_the_audit_log_and_a_chinese_user_gets_chinese(served: Served) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # as long as the page's own waits (a loaded box)
    _add_user(served, "auditor", "admin", "en")
    _add_user(served, "lin", "engineer", "zh")
    with _browser() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(UI_TIMEOUT_MS)
        _login(page, served.url, "auditor", "a long enough password")
        page.get_by_role("tab", name="Audit log").click()
        page.click("#audit-refresh")
        expect(page.locator("#audit")).to_contain_text("finding_reject")
        expect(page.locator("#audit")).to_contain_text("sign")
        _shot(page, "09-audit-admin")
        csv = page.request.get(served.url + "admin/audit.csv")
        assert csv.status == 200 and "finding_accept" in csv.text()
        # The picture routes serve only studies this user opened in the viewer (an audited view).
        for route in ("slice.png?review=1&pos=0&w=1500&l=-600", "pixels?review=1&index=0"):
            assert page.request.get(served.url + "viewer/" + route).status == 403
        # Log out in the same tab: the login page replaces the app, no second tab opens.
        page.click("#log-out")
        page.wait_for_url(re.compile(r".*/login.*"))
        assert len(page.context.pages) == 1
        expect(page.locator("#audit")).to_have_count(0)
        page.fill("#username", "lin")
        page.fill("#password", "a long enough password")
        page.click("#sign-in")
        page.wait_for_url(re.compile(r".*/app/zh/.*"))
        expect(page.get_by_role("tab", name="工作列表")).to_be_visible()
        expect(page.locator("#worklist")).to_contain_text("已签署")  # the signed demo study
        _shot(page, "10-worklist-zh")
        # The viewer in Chinese: the patient on the image and in the banner, the corners and
        # tools in Chinese.
        page.locator("#worklist div[role=row]").first.locator("[role=gridcell]").nth(3).click()
        page.wait_for_function("window.aidxViewer && window.aidxViewer.paints > 0")
        expect(page.locator("#aidx-tl")).to_contain_text("DEMO, CHEST PHANTOM")
        expect(page.locator("#viewer-status")).to_contain_text("DEMO, CHEST PHANTOM")
        expect(page.locator("#aidx-slice-info")).to_contain_text("图像")
        expect(page.locator("#aidx-toolbar")).to_contain_text("冠状位")
        _shot(page, "11-viewer-zh")
        browser.close()


def _check_signed_report(served: Served, accepted: int, rejected: int, added: int) -> None:
    store = Store(f"sqlite:///{served.data_dir / 'aidx.db'}", root=served.data_dir)
    try:
        with store.engine.connect() as conn:
            # Through the store's columns: the path is recorded relative to the storage root.
            (signed_uid, signed_path) = conn.execute(
                select(reviews.c.signed_sr_uid, reviews.c.signed_sr_path).where(
                    reviews.c.state == "signed"
                )
            ).one()
        items = [i for i in store.outbox_items() if str(signed_path) in i.files]
        assert [i.destination for i in items] == ["PACS"]
        assert dciodvfy_errors(Path(signed_path)) == []
        sr = hd.sr.srread(signed_path)
        assert sr.VerificationFlag == "VERIFIED"
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Demo^Radiologist"
        # highdicom reads the decisions back: one group per included finding.
        decided = []
        for group in sr.content.get_image_measurement_groups():
            (evaluation,) = group.get_qualitative_evaluations(name=DECISION)
            decided.append(evaluation[0].ConceptCodeSequence[0].CodeValue)
        assert sorted(decided) == sorted(["ACCEPTED"] * accepted + ["ADDED"] * added)
        assert sr.PredecessorDocumentsSequence  # the AI SR
        # Orthanc received the signed SR next to the AI one.
        poll_until(
            lambda: len(study_series(served.orthanc, served.study_uid).get("SR", [])) >= 2,
            60.0,
            "the signed SR in Orthanc",
            log_path=served.log_path,
        )
        uids = {
            hd.sr.srread(p).SOPInstanceUID
            for p in downloads(
                served.orthanc, served.study_uid, "SR", served.data_dir / "from-orthanc"
            )
        }
        assert signed_uid in uids
        # The audit log holds each step.
        actions = [e.action for e in Audit(store).query(username="demo")]
        for action in (
            "login",
            "study_view",
            "finding_accept",
            "finding_reject",
            "finding_add",
            "sign",
        ):
            assert action in actions, (action, actions)
        assert actions.count("finding_reject") == rejected
        assert Accounts(store).get_user("demo") is not None
    finally:
        store.close()
