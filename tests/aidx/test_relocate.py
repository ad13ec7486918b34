"""The store records every file relative to the storage root (issues 19 and 21): a data folder
written at one path and moved to another (a restore into a new folder, a shared root mounted
elsewhere) serves from there with the same rows: status, the review app's study and sign-off,
and the outbox."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from aidx.cli.pipeline import storage_problem
from aidx.cli.status import study_status
from aidx.config import DestinationConfig, load_config
from aidx.store.store import Store
from dicom_node.export import ExportWorker
from tests.aidx.instances import instance_record
from tests.aidx.signed_site import Site, open_site, signed_site
from tests.conftest import require_tool
from tests.peers import LOOPBACK, Storescp
from ui.signoff import sign
from ui.viewer_session import study_view

# Every column that holds a path, and the outbox's JSON list of them.
PATH_COLUMNS = (
    "SELECT path FROM instances",
    "SELECT result_dir FROM jobs",
    "SELECT findings_path FROM results",
    "SELECT sr_path FROM results",
    "SELECT seg_path FROM results",
    "SELECT signed_sr_path FROM reviews",
    "SELECT files FROM outbox",
)


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The signed site written at one folder, moved to another (its store closed first)."""
    first = signed_site(tmp_path_factory.mktemp("relocate") / "first")
    second = first.parent / "second"
    first.rename(second)
    return open_site(second)


def test_the_store_records_no_absolute_path(moved: Site) -> None:
    database = moved.config.data_dir / "aidx.db"
    with sqlite3.connect(database) as db:
        values = [v for query in PATH_COLUMNS for (v,) in db.execute(query) if v is not None]
    assert len(values) > 30  # the study's images, its results, the signed SR, the outbox items
    assert not [v for v in values if v.startswith("/") or '"/' in v], values[:5]


def test_status_and_the_start_check_find_the_files_in_the_new_folder(moved: Site) -> None:
    root = moved.config.storage_root()
    assert storage_problem(moved.config, moved.store) is None
    report = study_status(moved.store, moved.study_uid)
    assert report is not None
    (result,) = report["results"]
    for key in ("findings_path", "sr_path", "seg_path"):
        assert Path(result[key]).is_relative_to(root) and Path(result[key]).is_file(), key
    (review,) = report["reviews"]
    assert Path(review["signed_sr_path"]).is_relative_to(root)
    assert Path(review["signed_sr_path"]).is_file()
    for row in moved.store.study_instances(moved.study_uid):
        assert Path(row["path"]).is_relative_to(root) and Path(row["path"]).is_file()


def test_the_review_app_opens_and_amends_the_moved_study(moved: Site) -> None:
    reviews, user = moved.reviews, moved.radiologist
    view = study_view(SimpleNamespace(store=moved.store, reviews=reviews), moved.review_id)
    assert view.findings  # images, findings and SEG read from the new folder
    # An amendment reads the AI SR, the previous signed SR and the images, all at new paths.
    reviews.reopen(moved.review_id, user)
    signed_dir = moved.config.storage_root() / "signed"
    amended = sign(reviews, moved.store, moved.review_id, user, signed_dir, client="10.0.0.7")
    assert reviews.case(moved.review_id).sign_count == 2
    assert amended.sr_path.is_relative_to(moved.config.storage_root())


def test_the_outbox_sends_the_moved_files(moved: Site, tmp_path: Path) -> None:
    require_tool("storescp", "dcmtk")
    items = moved.store.outbox_items("pending")
    assert items and all(Path(f).is_file() for i in items for f in i.files)
    with Storescp(tmp_path / "pacs") as pacs:
        moved.config.destinations = {
            "PACS": DestinationConfig(ae_title=pacs.aet, host=LOOPBACK, port=pacs.port)
        }
        ExportWorker(moved.config, moved.store).deliver_due()
        received = pacs.wait_for_files(sum(len(i.files) for i in items))
    assert len(received) == sum(len(i.files) for i in items)
    assert not moved.store.outbox_items("pending")


def test_rows_recorded_outside_the_root_are_refused_with_the_fix(tmp_path: Path) -> None:
    """Rows of an aidx before relative paths (absolute) that lie outside this host's root."""
    config = load_config(env={}, overrides={"data_dir": str(tmp_path / "data")})
    elsewhere = tmp_path / "old-root" / "spool" / "1.dcm"
    elsewhere.parent.mkdir(parents=True)
    config.data_dir.mkdir()
    elsewhere.write_bytes(b"DICM")
    old = Store(config.store_url())  # no root: paths recorded as given
    old.index_instance(instance_record("1.2.3", 1, path=str(elsewhere)), 1.0, 1.0)
    old.close()
    store = Store.for_config(config)
    try:
        assert store.recent_instance_paths(1) == [str(elsewhere)]  # passes unchanged
        problem = storage_problem(config, store)
    finally:
        store.close()
    assert problem is not None and "lie elsewhere" in problem and "set storage.root" in problem
