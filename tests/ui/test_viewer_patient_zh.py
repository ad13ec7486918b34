"""The patient on screen, in Chromium: a GB18030 name (every component group, no ``^``) in the
viewer's corner and banner, for an English and a Chinese reader, with the tools in their
language."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.ui.reviewed_study import PASSWORD, ReviewedStudy, reviewed_study
from tests.ui.test_review_e2e import ARTIFACTS, CHROMIUM_FLAGS, UI_TIMEOUT_MS
from ui.web import UiServer

pytestmark = pytest.mark.external

NAME = "Wang^XiaoDong=王^小东="
SHOWN = "Wang, XiaoDong (王, 小东)"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UiServer, ReviewedStudy]]:
    require_tool("chromium", "chromium")
    study = reviewed_study(
        tmp_path_factory.mktemp("patient-zh"), patient_name=NAME, charset="GB18030"
    )
    study.accounts.add_user(
        "lin", PASSWORD, role="radiologist", display_name="Lin^Yi", language="zh"
    )
    study.config.ui.port = 0
    server = UiServer(study.config, study.store)
    server.start()
    try:
        yield server, study
    finally:
        server.stop()
        study.store.close()


@pytest.mark.parametrize(
    ("user", "lang", "tool"), [("rad", "en", "Coronal"), ("lin", "zh", "冠状位")]
)
def test_the_viewer_names_the_patient_in_both_languages(
    served: tuple[UiServer, ReviewedStudy], user: str, lang: str, tool: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    # the page's own waits as long as the page's (a loaded 2-core machine, tests in parallel)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    server, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(server.url)
        page.fill("#username", user)
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(re.compile(rf".*/app/{lang}/.*"))
        expect(page.locator("#worklist")).to_contain_text(SHOWN)
        page.locator("#worklist div[role=row]").first.locator("[role=gridcell]").nth(3).click()
        page.wait_for_function("window.aidxViewer && window.aidxViewer.paints > 0")
        expect(page.locator("#aidx-tl")).to_contain_text(SHOWN)
        expect(page.locator("#viewer-status")).to_contain_text(SHOWN)
        expect(page.locator("#aidx-toolbar")).to_contain_text(tool)
        assert "^" not in page.locator("#aidx-tl").inner_text()
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"12-viewer-gb18030-{lang}.png"))
        browser.close()
