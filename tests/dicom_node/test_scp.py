"""Storage SCP basics against DCMTK: echo, store as received, index, idempotent re-send,
study assembly with late arrivals."""

from __future__ import annotations

from pathlib import Path

import pydicom

from aidx.store.store import instances, jobs
from tests.conftest import require_tool
from tests.dicom_node.conftest import NodeFactory, wait_for
from tests.peers import echoscu, storescu


def test_echo_and_store_from_dcmtk(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("storescu", "dcmtk")
    node = start_node()
    assert echoscu("127.0.0.1", node.port, called_aet="AIDX", calling_aet="DCMTK").returncode == 0
    result = storescu("127.0.0.1", node.port, [small_study], called_aet="AIDX", calling_aet="CT1")
    assert result.returncode == 0, result.stdout + result.stderr
    sent = sorted(small_study.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(sent[0]).StudyInstanceUID)
    indexed = node.store.study_instances(study_uid)
    assert len(indexed) == len(sent)
    by_uid = {row["sop_uid"]: row for row in indexed}
    for path in sent:
        original = pydicom.dcmread(path)
        row = by_uid[str(original.SOPInstanceUID)]
        stored = Path(row["path"])
        # Stored as received: the data set bytes are identical, with a valid Part 10 header.
        copy = pydicom.dcmread(stored)
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData
        assert row["calling_ae"] == "CT1"
        assert row["size"] == stored.stat().st_size
    study = node.store.study(study_uid)
    assert study is not None
    assert study["instance_count"] == len(sent)
    assert study["calling_ae"] == "CT1"


def test_resent_instances_are_stored_once(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("storescu", "dcmtk")
    node = start_node()
    for _ in range(2):
        result = storescu("127.0.0.1", node.port, [small_study], called_aet="AIDX")
        assert result.returncode == 0
    files = sorted(small_study.glob("*.dcm"))
    assert node.store.count(instances) == len(files)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    study = node.store.study(study_uid)
    assert study is not None and study["instance_count"] == len(files)
    assert len(list(node.spool.files())) == len(files)


def test_study_completes_after_quiet_period_and_reopens_on_late_arrival(
    start_node: NodeFactory, small_study: Path
) -> None:
    require_tool("storescu", "dcmtk")
    # Longer than any pause between two images of one association on a loaded machine (at
    # 0.3 s a busy test run once completed the study before its last images came).
    node = start_node(node__study_quiet_period_s=1.5)
    files = sorted(small_study.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    first, late = files[:-2], files[-2:]
    assert storescu("127.0.0.1", node.port, first, called_aet="AIDX").returncode == 0
    wait_for(lambda: len(node.store.study_jobs(study_uid)) == 1, "first completion")
    study = node.store.study(study_uid)
    assert study is not None
    assert (study["state"], study["version"], study["instance_count"]) == (
        "complete",
        1,
        len(first),
    )
    assert storescu("127.0.0.1", node.port, late, called_aet="AIDX").returncode == 0
    wait_for(lambda: len(node.store.study_jobs(study_uid)) == 2, "second completion")
    study = node.store.study(study_uid)
    assert study is not None
    assert (study["state"], study["version"], study["instance_count"]) == (
        "complete",
        2,
        len(files),
    )
    assert [j["study_version"] for j in node.store.study_jobs(study_uid)] == [1, 2]
    # Nothing more arrives: no further job, however long we look.
    node.assembler.run_once()
    assert node.store.count(jobs) == 2
