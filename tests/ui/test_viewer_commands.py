"""The viewer script's requests to the server (#viewer-command), through Gradio's queue as the
page sends them: a finding selected from the keyboard moves the view, a click marks a point, a
caliper line fills the diameter of the selected finding or of a new one, a garbled command is a
message; and once signed, the decision buttons are off and "re-open" is on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.security.test_web_sessions import server, signed_in, study  # noqa: F401 (fixtures)
from tests.ui.gradio_events import GradioPage
from tests.ui.reviewed_study import ReviewedStudy
from ui.web import UiServer


@pytest.fixture(scope="module")
def page(server: UiServer, study: ReviewedStudy) -> Iterator[GradioPage]:  # noqa: F811
    client = signed_in(server, "rad")
    try:
        page = GradioPage(client)
        page.run(None, "load")
        review = study.review_id()
        page.run(
            "worklist",
            "select",
            event_data={"index": [0, 0], "value": review, "row_value": [review]},
        )
        yield page
    finally:
        client.close()


def send(page: GradioPage, command: dict[str, Any] | str) -> dict[str, Any]:
    sent = command if isinstance(command, str) else json.dumps(command)
    return page.run("viewer-command-send", "click", {"viewer-command": sent})


def meta(outputs: dict[str, Any]) -> dict[str, str]:
    html = outputs["viewer-meta"]
    html = html if isinstance(html, str) else html.get("value", "")
    pairs = [part.split('="', 1) for part in html.split(" data-")[1:]]
    return {k: v.split('"', 1)[0] for k, v in pairs}


def test_commands(page: GradioPage, study: ReviewedStudy) -> None:  # noqa: F811
    review = study.review_id()
    keys = [f.key for f in study.reviews.findings(review)]
    first = meta(send(page, {"op": "select", "key": keys[0]}))
    selected = send(page, {"op": "select", "key": keys[-1]})
    moved = meta(selected)
    assert keys[-1] in selected["selected"]
    assert int(moved["goto"]) == int(first["goto"]) + 1  # the page moves to the finding
    assert moved["sel"] == keys[-1]

    marked = send(page, {"op": "point", "pos": 3, "row": 40.0, "col": 50.0})
    assert "Marked point: image" in marked["clicked-point"]
    assert meta(marked)["pt"].endswith(",40,50")
    assert meta(marked)["goto"] == moved["goto"]  # a click does not move the view

    for_selected = send(
        page, {"op": "measure", "pos": 3, "row": 1, "col": 2, "mm": 7.44, "target": "selected"}
    )
    assert for_selected["diameter"] == 7.4
    assert "7.4 mm" in for_selected["message"] and keys[-1] in for_selected["message"]
    for_new = send(
        page, {"op": "measure", "pos": 5, "row": 30.5, "col": 60.0, "mm": 9.0, "target": "new"}
    )
    assert for_new["new-diameter"] == 9.0
    assert meta(for_new)["pt"].endswith(",30.5,60")

    for bad in ("{", {"op": "select", "key": "ai-999"}, {"op": "point", "pos": 1, "row": 500}):
        refused = send(page, bad)
        assert refused["message"].startswith("⚠ "), refused["message"]
        assert refused["findings"]["__type__"] == "update"  # the table stays as it was


def test_after_signing_only_reopen_is_on(page: GradioPage, study: ReviewedStudy) -> None:  # noqa: F811
    review = study.review_id()
    for f in study.reviews.findings(review):
        if f.status == "pending":
            study.reviews.decide(review, f.key, "reject", study.radiologist)
    signed = page.run("sign", "click")
    assert "Signed" in signed["message"]
    for button in ("accept", "reject", "edit", "add", "remove", "sign"):
        assert signed[button]["interactive"] is False, button
    assert signed["reopen"]["interactive"] is True
    reopened = page.run("reopen", "click")
    assert reopened["accept"]["interactive"] is True
    assert reopened["reopen"]["interactive"] is False
