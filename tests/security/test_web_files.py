"""Files of the review app: it takes no uploads (Gradio's upload route accepted 200 MB from any
signed-in user into /tmp/gradio), and its temporary files (Gradio's cache of the finding
thumbnails) lie under the data folder, 0640 in 0750 folders, and are gone
once the server has stopped (they stayed in /tmp/aidx-ui-*, 0644 in /tmp/gradio)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.peers import poll_until
from tests.ui.gradio_events import GradioPage
from tests.ui.reviewed_study import PASSWORD, reviewed_study
from tests.ui.test_web import login
from tests.ui.web_client import empty_app
from ui.temp_files import FOLDER, _host
from ui.web import UiServer


@pytest.mark.parametrize("prefix", ["/app/en", "/app/zh"])
def test_uploads_are_refused(tmp_path: Path, prefix: str) -> None:
    web = empty_app(tmp_path)
    gradio_cache = Path(os.environ["GRADIO_TEMP_DIR"])
    assert gradio_cache.is_relative_to(tmp_path)
    before = {p for p in gradio_cache.rglob("*") if p.is_file()}
    with TestClient(web.gate, base_url="http://127.0.0.1") as client:
        login(client, "eng")
        payload = {"files": ("scan.bin", b"\0" * (1 << 20), "application/octet-stream")}
        upload = client.post(f"{prefix}/gradio_api/upload", files=payload)
        assert upload.status_code == 403
        assert upload.json() == {"detail": "this app takes no file uploads"}
        slashed = client.post(f"{prefix}/gradio_api/upload/?upload_id=x", files=payload)
        assert slashed.status_code == 403
        blob = client.post(
            f"{prefix}/gradio_api/component_server",
            data={"session_hash": "x", "component_id": "1", "fn_name": "f", "data": "x"},
            files=payload,
        )
        assert blob.status_code == 403
        huge = client.post(
            f"{prefix}/gradio_api/queue/join",
            content=b"{" + b" " * (2 << 20) + b"}",
            headers={"content-type": "application/json"},
        )
        assert huge.status_code == 413
    assert {p for p in gradio_cache.rglob("*") if p.is_file()} == before


def test_temporary_files_are_private_under_the_data_folder_and_go_at_stop(
    tmp_path: Path,
) -> None:
    study = reviewed_study(tmp_path)
    study.config.ui.port = 0
    temp_root = study.config.data_dir / FOLDER
    temp_root.mkdir()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = temp_root / f"{_host()}_{gone.stdout.strip()}_crashed"  # a process that is gone
    (stale / "gradio").mkdir(parents=True)
    other_host = temp_root / "another-host_1_x"  # may be alive: not ours to remove
    other_host.mkdir()
    umask = os.umask(0o022)
    os.umask(umask)
    server = UiServer(study.config, study.store)
    server.start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=60) as client:

            def served() -> bool:
                try:
                    return client.get("/login").status_code == 200
                except httpx.TransportError:
                    return False

            poll_until(served, 30.0, "the login page")
            signed_in = client.post("/login", data={"username": "rad", "password": PASSWORD})
            assert signed_in.status_code == 303
            page = GradioPage(client)
            page.run(None, "load")
            review = study.review_id()
            opened = page.run(
                "worklist",
                "select",
                event_data={"index": [0, 0], "value": review, "row_value": [review]},
            )
            thumbnail = opened["thumbnails"][0]["image"]["path"]
            picture = client.get(f"/app/en/gradio_api/file={thumbnail}")
            assert picture.status_code == 200
            assert picture.content[8:12] == b"WEBP" or picture.content.startswith(b"\x89PNG")
        process_dir = server.ctx.temp.path
        assert process_dir.parent == temp_root
        shown = [Path(item["image"]["path"]) for item in opened["thumbnails"]]
        assert shown
        for path in shown:
            assert path.is_relative_to(process_dir / "gradio"), path
        files = [p for p in process_dir.rglob("*") if p.is_file()]
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
        for folder in [process_dir, *(p for p in process_dir.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder
        assert stat.S_IMODE(temp_root.stat().st_mode) == 0o750
        assert not stale.exists() and other_host.exists()
    finally:
        server.stop()
        study.store.close()
    assert not process_dir.exists()  # slices and thumbnails gone with the server
    current = os.umask(0o022)
    os.umask(current)
    assert current == umask  # the server gave the process its umask back
