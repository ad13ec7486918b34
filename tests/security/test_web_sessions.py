"""Gradio keeps each page's state (the open study, the selected finding) under the session_hash
the browser chose. Another signed-in user who sends a radiologist's session_hash must not change
nor read that state: before, an engineer changed the radiologist's selected finding, and the
radiologist's Accept was stored for ai-3 while their screen said ai-1."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.peers import poll_until
from tests.ui.gradio_events import GradioEventError, GradioPage
from tests.ui.reviewed_study import PASSWORD, ReviewedStudy, reviewed_study
from ui.accounts import PermissionDenied
from ui.app import current_user
from ui.web import UiServer


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ReviewedStudy:
    return reviewed_study(tmp_path_factory.mktemp("sessions"))


@pytest.fixture(scope="module")
def server(study: ReviewedStudy) -> Iterator[UiServer]:
    """The app in uvicorn: one event loop for every client, as in use (Gradio's queue)."""
    study.config.ui.port = 0
    server = UiServer(study.config, study.store)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def signed_in(server: UiServer, user: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url.rstrip("/"), timeout=60)

    def login() -> bool:
        try:
            response = client.post("/login", data={"username": user, "password": PASSWORD})
        except httpx.TransportError:
            return False
        return response.status_code == 303

    poll_until(login, 30.0, f"a sign-in of {user}")
    return client


@pytest.fixture(scope="module")
def clients(server: UiServer) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    rad, eng = signed_in(server, "rad"), signed_in(server, "eng")
    try:
        yield rad, eng
    finally:
        rad.close()
        eng.close()


def select(page: GradioPage, key: str) -> dict[str, Any]:
    return page.run(
        "findings", "select", event_data={"index": [0, 0], "value": key, "row_value": [key]}
    )


def test_another_user_can_neither_change_nor_read_a_radiologists_page(
    study: ReviewedStudy, clients: tuple[httpx.Client, httpx.Client]
) -> None:
    rad, eng = clients
    review = study.review_id()
    keys = [f.key for f in study.reviews.findings(review)]
    assert len(keys) >= 2, keys
    page = GradioPage(rad)
    page.run(None, "load")
    opened = page.run(
        "worklist", "select", event_data={"index": [0, 0], "value": review, "row_value": [review]}
    )
    assert study.study_uid in opened["viewer-status"]
    # the patient as the PACS names them, never the bare UID alone
    assert "**PHANTOM, CHEST**" in opened["viewer-status"]
    assert "1960-01-01" in opened["viewer-status"]
    assert keys[0] in select(page, keys[0])["selected"]  # what the radiologist's screen shows

    intruder = GradioPage(eng, session_hash=page.session_hash)
    with pytest.raises(GradioEventError, match="403"):
        select(intruder, keys[1])
    with pytest.raises(GradioEventError, match="403"):
        intruder.run(None, "load")
    for path in (
        f"/app/en/gradio_api/queue/data?session_hash={page.session_hash}",
        f"/app/en/gradio_api/heartbeat/{page.session_hash}",
        f"/app/zh/gradio_api/queue/data?session_hash={page.session_hash}",
    ):
        assert eng.get(path).status_code == 403, path
    cancel = eng.post(
        "/app/en/gradio_api/cancel",
        json={"session_hash": page.session_hash, "fn_index": 0, "event_id": "x"},
    )
    assert cancel.status_code == 403

    accepted = page.run("accept", "click", {"reason": "", "diameter": None})
    assert keys[0] in accepted["selected"]
    decided = {f.key: f.status for f in study.reviews.findings(review)}
    assert decided[keys[0]] == "accepted"
    assert all(decided[k] == "pending" for k in keys[1:]), decided

    own = GradioPage(eng)  # the engineer's own page works as before
    assert "Engineer" in own.run(None, "load")["header"]


def test_handlers_check_the_owner_of_the_page_session(server: UiServer) -> None:
    """Behind the guard, each handler checks it again (current_user)."""
    ctx = server.ctx
    rad = SimpleNamespace(username="rad", session_hash="page-of-rad")
    assert current_user(ctx, rad).username == "rad"  # type: ignore[arg-type]
    eng = SimpleNamespace(username="eng", session_hash="page-of-rad")
    with pytest.raises(PermissionDenied, match="another sign-in"):
        current_user(ctx, eng)  # type: ignore[arg-type]
    assert current_user(ctx, rad).username == "rad"  # type: ignore[arg-type]


def test_a_refused_action_is_a_message_beside_the_controls_and_the_viewer_stays(
    study: ReviewedStudy, clients: tuple[httpx.Client, httpx.Client]
) -> None:
    """Signing with findings undecided is refused: the message says why, and the viewer's
    channel, the table and the status keep what they showed (no "Error" badges, no failed
    event)."""
    rad, _ = clients
    review = study.review_id()
    assert any(f.status == "pending" for f in study.reviews.findings(review))
    page = GradioPage(rad)
    page.run(None, "load")
    page.run(
        "worklist", "select", event_data={"index": [0, 0], "value": review, "row_value": [review]}
    )
    refused = page.run("sign", "click")  # raises GradioEventError if the event failed
    assert refused["message"].startswith("⚠ ")
    assert "undecided" in refused["message"] or "decide" in refused["message"]
    for kept in ("viewer-meta", "findings", "thumbnails", "viewer-status"):
        # gr.skip(): an update that changes nothing (gr.HTML nests its empty props)
        assert refused[kept]["__type__"] == "update", (kept, refused[kept])
        assert set(refused[kept]) <= {"__type__", "props"}, (kept, refused[kept])
        assert refused[kept].get("props", {"__type__": "update"}) == {"__type__": "update"}


def test_no_download_or_share_icons_over_patient_images(
    clients: tuple[httpx.Client, httpx.Client],
) -> None:
    rad, _ = clients
    page = GradioPage(rad)
    props = {
        c["props"].get("elem_id"): c["props"] for c in page.config["components"] if "props" in c
    }
    assert props["thumbnails"]["buttons"] == []  # the slices are the page's canvas: no icons
    assert not any(c.get("type") == "image" for c in page.config["components"])
