"""The receive path's index (Store.index_instance and uid_conflict run on the driver's own cursor,
:class:`aidx.store.store._Statement`): the same outcomes on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, update

from aidx.store.schema import instances, series, studies
from aidx.store.store import InstanceRecord, Store
from tests.aidx.instances import instance_record

STUDY = "1.2.826.0.1.3680043.8.498.77"


def record(n: int, study: str = STUDY, patient_id: str = "P1") -> InstanceRecord:
    return instance_record(study, n, patient_id=patient_id, path=f"/spool/{n}.dcm", size=1000 + n)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'aidx.db'}"
    s = Store(url)
    try:
        yield s
    finally:
        s.close()


def study_row(store: Store) -> dict[str, object]:
    with store.engine.connect() as conn:
        row = conn.execute(select(studies).where(studies.c.study_uid == STUDY)).mappings().one()
        return dict(row)


def test_new_duplicate_and_conflicting_instances(store: Store) -> None:
    first = store.index_instance(record(1), 100.0, 5.0)
    assert (first.outcome, first.study_opened) == ("new", True)
    second = store.index_instance(record(2), 101.0, 5.0)
    assert (second.outcome, second.study_opened) == ("new", False)
    row = study_row(store)
    assert (row["instance_count"], row["bytes"], row["last_arrival"]) == (2, 2003, 101.0)
    with store.engine.connect() as conn:
        count = conn.execute(select(series.c.instance_count)).scalar_one()
        assert count == 2

    # A re-send: the row points to the new file; nothing is counted twice.
    again = store.index_instance(replace(record(2), path="/spool/2b.dcm"), 102.0, 5.0)
    assert again.outcome == "duplicate"
    with store.engine.connect() as conn:
        path = conn.execute(
            select(instances.c.path).where(instances.c.sop_uid == record(2).sop_uid)
        ).scalar_one()
    assert path == "/spool/2b.dcm"
    assert study_row(store)["instance_count"] == 2

    # The same SOP Instance UID for another patient, or in another study: refused, UIDs named.
    assert store.uid_conflict(record(1)) == ""
    other_patient = replace(record(1), patient_id="P2")
    assert "another patient" in store.uid_conflict(other_patient)
    assert store.index_instance(other_patient, 103.0, 5.0).outcome == "conflict"
    moved = replace(record(1), study_uid=STUDY + ".9", series_uid=STUDY + ".9.1")
    why = store.index_instance(moved, 104.0, 5.0).conflict
    assert STUDY in why and STUDY + ".9" in why


def test_a_late_instance_reopens_a_complete_study_and_a_shorter_quiet_period_replans(
    store: Store,
) -> None:
    store.index_instance(record(1), 100.0, 5.0)
    assert store.index_instance(record(2), 101.0, 5.0).study_opened is False
    # A peer with a shorter quiet period: the assembler must plan again.
    assert store.index_instance(record(3), 102.0, 1.0).study_opened is True
    assert study_row(store)["quiet_period_s"] == 1.0
    with store.engine.begin() as conn:
        conn.execute(update(studies).values(state="complete"))
    late = store.index_instance(record(4), 200.0, 1.0)
    assert (late.outcome, late.study_opened) == ("new", True)
    assert study_row(store)["state"] == "updated"
