"""The routes the page's own viewer reads (ui/viewer.js): the series description, lossless int16
pixels of axial slices and coronal/sagittal reformats, and the marks laid over a slice; each
only after the user opened the study, each bad parameter a 400 that names it. And the viewer's
commands to the server, checked before use."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from tests.ui.test_web import login
from ui import viewer_session
from ui.viewer import StudyView
from ui.viewer_pane import viewer_command
from ui.viewer_session import study_view
from ui.web import UiContext, create_app


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, ReviewedStudy]:
    study = reviewed_study(tmp_path_factory.mktemp("volume-route"))
    ctx = UiContext(study.config, study.store, study.accounts, study.reviews)
    _, gate = create_app(ctx)
    client = TestClient(gate, base_url="http://127.0.0.1")
    login(client, "eng")
    return client, study


def _ctx(study: ReviewedStudy) -> UiContext:
    return UiContext(study.config, study.store, study.accounts, study.reviews)


def test_only_after_the_study_was_opened(app: tuple[TestClient, ReviewedStudy]) -> None:
    client, study = app
    review = study.review_id()
    routes = (
        f"/viewer/study.json?review={review}",
        f"/viewer/pixels?review={review}&plane=axial&index=0",
        f"/viewer/marks.png?review={review}&pos=0",
    )
    for route in routes:
        assert client.get(route).status_code == 403, route
    study.reviews.open(review, study.engineer)  # what opening it in the viewer records
    for route in routes:
        answer = client.get(route)
        assert answer.status_code == 200, (route, answer.text)
        assert answer.headers["cache-control"] == "private, no-store"
    unknown = review + 99
    assert client.get(f"/viewer/study.json?review={unknown}").status_code == 404
    assert client.get(f"/viewer/pixels?review={unknown}&index=0").status_code == 404


def test_study_description(app: tuple[TestClient, ReviewedStudy]) -> None:
    client, study = app
    review = study.review_id()
    study.reviews.open(review, study.engineer)
    described = client.get(f"/viewer/study.json?review={review}").json()
    view = study_view(_ctx(study), review)
    assert (described["rows"], described["cols"]) == view.shape == (96, 96)
    assert described["count"] == view.slice_count == 30
    assert described["forward"] == (view.slice_at(0) == 0)
    spacing = described["spacing"]
    assert (spacing["slice"], spacing["row"], spacing["col"]) == pytest.approx(view.volume.spacing)
    assert len(described["images"]) == len(described["locations"]) == 30
    assert described["images"][0] == str(view.instance_number(view.slice_at(0)))
    assert described["patient"]["name"] == "PHANTOM, CHEST"  # a PN as read, never with ^
    assert described["patient"]["born"] == "1960-01-01"
    assert described["series"]["thickness"] == "2.5"
    keys = [f.key for f in study.reviews.findings(review)]
    assert [f["key"] for f in described["findings"]] == keys
    first = described["findings"][0]
    assert first["colour"].startswith("#") and 0 <= first["pos"] < 30
    # marks are fetched only for the slices the findings touch, the key slice among them
    assert round(first["pos"]) in described["marked"]
    assert set(described["marked"]) <= set(range(30))
    for bad, why in (("0", "out of range"), ("x", "integer"), ("", "integer")):
        answer = client.get(f"/viewer/study.json?review={bad}")
        assert answer.status_code == 400 and why in answer.text, answer.text


def test_pixels_are_the_series_values(app: tuple[TestClient, ReviewedStudy]) -> None:
    client, study = app
    review = study.review_id()
    study.reviews.open(review, study.engineer)
    view = study_view(_ctx(study), review)
    hu = view.volume.hu
    order = [view.slice_at(p) for p in range(view.slice_count)]
    expected = {
        ("axial", 7): hu[order[7]],
        ("coronal", 40): hu[order, 40, :],
        ("sagittal", 50): hu[order, :, 50],
    }
    for (plane, index), want in expected.items():
        answer = client.get(f"/viewer/pixels?review={review}&plane={plane}&index={index}")
        assert answer.status_code == 200, answer.text
        height, width = int(answer.headers["x-aidx-height"]), int(answer.headers["x-aidx-width"])
        got = np.frombuffer(answer.content, dtype="<i2").reshape(height, width)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, np.rint(want).astype(np.int16))  # lossless
    raw = client.get(f"/viewer/pixels?review={review}&index=0")
    assert raw.headers["content-type"] == "application/octet-stream"
    assert len(raw.content) == 96 * 96 * 2
    for query, why in (
        ("plane=axial&index=30", "0..29"),
        ("plane=coronal&index=96", "0..95"),
        ("plane=oblique&index=0", "axial, coronal, sagittal"),
        ("plane=axial&index=-1", "out of range"),
        ("plane=axial", "index is missing"),
    ):
        answer = client.get(f"/viewer/pixels?review={review}&{query}")
        assert answer.status_code == 400 and why in answer.text, (query, answer.text)


def test_marks_are_transparent_but_for_what_is_drawn(
    app: tuple[TestClient, ReviewedStudy],
) -> None:
    client, study = app
    review = study.review_id()
    study.reviews.open(review, study.engineer)
    described = client.get(f"/viewer/study.json?review={review}").json()
    smallest = min(described["findings"], key=lambda f: f["diameter_mm"])
    key_pos = round(smallest["pos"])

    def rgba(query: str) -> np.ndarray:
        answer = client.get(f"/viewer/marks.png?review={review}&{query}")
        assert answer.status_code == 200, answer.text
        with Image.open(io.BytesIO(answer.content)) as png:
            assert png.mode == "RGBA" and png.size == (96, 96)
            return np.asarray(png)

    contour = rgba(f"pos={key_pos}")
    drawn = contour[..., 3] == 255
    assert 0 < drawn.sum() < 96 * 96
    assert (contour[..., 3][~drawn] == 0).all()  # opaque marks, the rest fully transparent
    assert rgba(f"pos={key_pos}&ov=0")[..., 3].max() == 0  # contours off: nothing drawn
    slice_index = study_view(_ctx(study), review).slice_at(key_pos)
    cross = rgba(f"pos={key_pos}&ov=0&pt={slice_index},48,48")
    assert cross[48, 48, 3] == 255 and tuple(cross[48, 48, :3]) == (255, 255, 0)
    assert client.get(f"/viewer/marks.png?review={review}&pos=0&w=0&l=0").status_code == 400


def test_viewer_commands_are_checked() -> None:
    refusal = "reload the page"
    assert viewer_command('{"op": "select", "key": "ai-2"}', refusal).key == "ai-2"
    point = viewer_command('{"op": "point", "pos": 3, "row": 10.5, "col": 20}', refusal)
    assert (point.op, point.pos, point.row, point.col) == ("point", 3, 10.5, 20.0)
    measure = viewer_command(
        '{"op": "measure", "pos": 3, "row": 1, "col": 2, "mm": 7.46, "target": "selected"}',
        refusal,
    )
    assert (measure.mm, measure.target) == (7.5, "selected")
    for bad in (
        "",
        "[]",
        '{"op": "delete"}',
        '{"op": "select", "key": ""}',
        '{"op": "point", "pos": -1, "row": 0, "col": 0}',
        '{"op": "point", "pos": true, "row": 0, "col": 0}',
        '{"op": "point", "pos": 1, "row": "x", "col": 0}',
        '{"op": "point", "pos": 1, "row": NaN, "col": 0}',
        '{"op": "measure", "pos": 1, "row": 0, "col": 0, "mm": 0}',
        '{"op": "measure", "pos": 1, "row": 0, "col": 0, "mm": 5, "target": "other"}',
    ):
        with pytest.raises(ValueError, match=refusal):
            viewer_command(bad, refusal)


def test_the_worklist_s_next_studies_open_ahead_once(
    app: tuple[TestClient, ReviewedStudy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """prewarm opens a study in the background; a user's open meanwhile waits for that one
    instead of reading the series a second time, and gets the same view."""
    _, study = app
    ctx = _ctx(study)
    review = study.review_id()
    key = (str(ctx.store.engine.url), review)
    viewer_session._cache.pop(key, None)
    real_open = StudyView.open
    release = threading.Event()
    opens: list[int] = []

    def held_open(*args: Any) -> StudyView:
        opens.append(1)
        assert release.wait(30), "the test never released the open"
        return real_open(*args)

    monkeypatch.setattr(viewer_session.StudyView, "open", held_open)
    viewer_session.prewarm(ctx, [review])
    got: list[StudyView] = []
    user = threading.Thread(target=lambda: got.append(viewer_session.study_view(ctx, review)))
    user.start()
    release.set()
    user.join(60)
    assert got and got[0] is viewer_session.study_view(ctx, review)
    assert opens == [1]
    viewer_session.prewarm(ctx, [review])  # cached already: nothing to do
    assert viewer_session._prewarmer.submit(lambda: None).result(30) is None
    assert opens == [1]
