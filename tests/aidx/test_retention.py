"""storage.retention (issue 21): the images of a study go once its jobs are done, its results
delivered and its reviews signed, after images_days or while the disk is fuller than
max_disk_percent (oldest first); never a study with a job running or failed, a review not
signed or a delivery pending. `aidx purge --dry-run` lists them; `aidx serve`'s loop deletes
them, audited; results stay."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, update

from aidx.cli import main
from aidx.config import AidxConfig, RetentionConfig, load_config
from aidx.pipeline.retention import RetentionLoop
from aidx.store.retention import plan
from aidx.store.schema import (
    audit_log,
    events,
    jobs,
    outbox,
    results,
    reviews,
    shadow_runs,
    studies,
)
from aidx.store.store import Store
from tests.aidx.instances import instance_record
from tests.peers import poll_until

DAY = 86400.0
NOW = time.time()
OLD = NOW - 40 * DAY  # beyond images_days 30

# study: (job state, review state or None, outbox state or None, ready when)
STUDIES = {
    "1.1": ("sent", "signed", "sent", OLD),  # done with long ago: goes
    "1.2": ("sent", "in_review", "sent", OLD),  # a review not signed
    "1.3": ("running", None, None, OLD),  # a job running
    "1.4": ("failed", None, None, OLD),  # a failed job (may be retried)
    "1.5": ("sent", "signed", "pending", OLD),  # a delivery pending
    "1.6": ("sent", "signed", "sent", NOW),  # done with, but recently
    "1.7": ("not_applicable", None, None, OLD - DAY),  # nothing to analyse, long ago: goes
    "1.8": ("sent", "signed", "sent", OLD),  # done with, but a challenger's shadow run queued
}


def add_study(
    store: Store, uid: str, job: str, review: str | None, item: str | None, at: float
) -> None:
    for n in range(2):
        path = store.root / "spool" / uid / f"{uid}.1" / f"{n}.dcm"  # type: ignore[operator]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"image" * 20)
        store.index_instance(instance_record(uid, n, path=str(path), size=100), at, 1.0)
    with store.engine.begin() as conn:
        conn.execute(update(studies).where(studies.c.study_uid == uid).values(state="complete"))
        job_id = conn.execute(
            jobs.insert().values(
                study_uid=uid, study_version=1, state=job, created_at=at, updated_at=at
            )
        ).inserted_primary_key[0]
        result_dir = store.root / "results" / uid  # type: ignore[operator]
        result_dir.mkdir(parents=True)
        (result_dir / "sr.dcm").write_bytes(b"sr")
        result_id = conn.execute(
            results.insert().values(
                job_id=job_id,
                study_uid=uid,
                series_uid=f"{uid}.1",
                model="m@1",
                study_version=1,
                findings_path=str(result_dir / "sr.dcm"),
                sr_path=str(result_dir / "sr.dcm"),
                sr_sop_uid=f"{uid}.9",
                finding_count=0,
                created_at=at,
            )
        ).inserted_primary_key[0]
        if review is not None:
            conn.execute(
                reviews.insert().values(
                    result_id=result_id,
                    study_uid=uid,
                    state=review,
                    created_at=at,
                    updated_at=at,
                    signed_at=at if review == "signed" else None,
                )
            )
        if item is not None:
            conn.execute(
                outbox.insert().values(
                    destination="PACS",
                    item_key=f"sr:{uid}",
                    study_uid=uid,
                    job_id=job_id,
                    files=json.dumps([str(result_dir / "sr.dcm")]),
                    state=item,
                    next_attempt_at=at,
                    created_at=at,
                    updated_at=at,
                    sent_at=at if item == "sent" else None,
                )
            )


@pytest.fixture
def site(tmp_path: Path) -> tuple[AidxConfig, Path]:
    config_file = tmp_path / "aidx.yaml"
    settings = {"data_dir": str(tmp_path / "data"), "storage": {"retention": {"images_days": 30}}}
    config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    config = load_config(config_file, env={})
    config.data_dir.mkdir()
    store = Store.for_config(config)
    try:
        for uid, (job, review, item, at) in STUDIES.items():
            add_study(store, uid, job, review, item, at)
        with store.engine.begin() as conn:
            job_id = conn.execute(select(jobs.c.id).where(jobs.c.study_uid == "1.8")).scalar_one()
            conn.execute(
                shadow_runs.insert().values(
                    job_id=job_id,
                    study_uid="1.8",
                    study_version=1,
                    model="m@2",
                    state="queued",
                    created_at=OLD,
                    updated_at=OLD,
                )
            )
    finally:
        store.close()
    return config, config_file


def images(store: Store, uid: str) -> list[Path]:
    if not (store.root / "spool" / uid).is_dir():  # type: ignore[operator]
        return []
    return sorted((store.root / "spool" / uid).rglob("*.dcm"))  # type: ignore[operator]


def test_a_dry_run_lists_what_goes_and_the_loop_deletes_it_audited(
    site: tuple[AidxConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, config_file = site
    assert main(["--config", str(config_file), "purge", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 2 images (200 bytes) of study 1.7 (images_days)" in out
    assert "would delete 2 images (200 bytes) of study 1.1 (images_days)" in out
    assert "4 images of 2 studies would go" in out
    store = Store.for_config(config)
    try:
        assert all(len(images(store, uid)) == 2 for uid in STUDIES)  # nothing went
        loop = RetentionLoop(store, config.storage.retention)  # as `aidx serve` runs it
        loop.start()
        try:
            # Files first, then rows: no rows left means the files went too.
            poll_until(
                lambda: not store.study_instances("1.1") and not store.study_instances("1.7"),
                30,
                "the loop's purge",
            )
        finally:
            loop.stop()
        kept = [uid for uid in STUDIES if uid not in ("1.1", "1.7")]
        assert all(len(images(store, uid)) == 2 for uid in kept)
        assert images(store, "1.1") == images(store, "1.7") == []
        assert store.study_instances("1.1") == [] and len(store.study_instances("1.2")) == 2
        assert not (store.root / "spool" / "1.1").exists()  # type: ignore[operator]
        assert (store.root / "results" / "1.1" / "sr.dcm").is_file()  # type: ignore[operator]
        with store.engine.connect() as conn:
            audited = conn.execute(
                select(audit_log.c.username, audit_log.c.action, audit_log.c.study_uid)
            ).all()
            timeline = conn.execute(
                select(events.c.study_uid, events.c.event).where(events.c.event == "images_purged")
            ).all()
        assert sorted(audited) == [
            ("system", "retention_purge", "1.1"),
            ("system", "retention_purge", "1.7"),
        ]
        assert sorted(timeline) == [("1.1", "images_purged"), ("1.7", "images_purged")]
    finally:
        store.close()
    # Run again: nothing more goes, and nothing the store lists is missing.
    assert main(["--config", str(config_file), "purge"]) == 0
    assert "0 images of 0 studies deleted" in capsys.readouterr().out
    assert main(["--config", str(config_file), "verify"]) == 0


def test_a_full_disk_takes_the_oldest_finished_studies_first_whatever_their_age(
    site: tuple[AidxConfig, Path],
) -> None:
    config, _ = site
    store = Store.for_config(config)
    try:
        full = RetentionConfig(max_disk_percent=50)
        # 950 of 1000 bytes used: 450 over the limit, three studies of 200 bytes.
        picked = plan(store, full, disk=(1000, 950))
        assert [(p.study_uid, p.rule) for p in picked] == [
            ("1.7", "max_disk_percent"),
            ("1.1", "max_disk_percent"),
            ("1.6", "max_disk_percent"),  # recent, but the disk is still too full
        ]
        assert [p.study_uid for p in plan(store, full, disk=(1000, 500))] == []
    finally:
        store.close()


def test_purge_without_a_rule_says_which_key_to_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "purge", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "set storage.retention.images_days or storage.retention.max_disk_percent" in err
