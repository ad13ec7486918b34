"""The node with Orthanc as the PACS on both sides: `aidx serve` (a separate process) delivers
its outbox once Orthanc comes up, across a restart; Orthanc pushes a study that the node
indexes and completes; `aidx echo` reaches Orthanc and reports a dead port."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.conftest import require_tool
from tests.dicom_node.aidx_process import AidxSetup, destination
from tests.dicom_node.conftest import NodeFactory, wait_for
from tests.peers import LOOPBACK, Orthanc, free_port

pytestmark = pytest.mark.external


@pytest.fixture(autouse=True)
def _orthanc() -> None:
    require_tool("Orthanc", "orthanc")


def study_uid(folder: Path) -> str:
    first = sorted(folder.glob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def new_instance_changes(orthanc: Orthanc) -> int:
    changes = orthanc.get("/changes?limit=10000")
    assert changes["Done"], "more changes than one page"
    return sum(1 for c in changes["Changes"] if c["ChangeType"] == "NewInstance")


def test_outbox_waits_for_the_pacs_and_delivers_once_after_a_restart(
    tmp_path: Path, small_study: Path
) -> None:
    files = sorted(small_study.glob("*.dcm"))
    pacs_port = free_port()  # Orthanc starts on it later; nothing listens there before
    aidx = AidxSetup.create(
        tmp_path / "aidx",
        destinations={"PACS": destination("ORTHANC", pacs_port)},
        outbox={"initial_backoff_s": 0.5, "max_backoff_s": 1.0, "poll_interval_s": 0.3},
    )
    first_log = tmp_path / "serve-1.log"
    with aidx.serve(first_log, single_process=True) as first:
        queued = aidx.run("send", str(small_study), "--to", "PACS", "--queue")
        assert queued.returncode == 0, queued.stderr
        assert f"outbox item 1 queued: {len(files)} files to PACS" in queued.stdout
        waiting = aidx.wait_for_item(
            lambda row: row.state == "pending" and row.tries > 0 and "unreachable" in row.detail,
            "a failed attempt recorded in the outbox",
            log_path=first_log,
        )
        assert waiting.files == len(files)
        assert waiting.detail.startswith("next ")
        assert f"association to ORTHANC@127.0.0.1:{pacs_port} aborted or unreachable" in (
            waiting.detail
        )
    assert first.returncode == 0, "aidx serve did not exit cleanly on SIGTERM"
    [stopped] = aidx.outbox()
    assert stopped.state == "pending"  # not lost, not left "sending"

    with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as orthanc:
        second_log = tmp_path / "serve-2.log"
        with aidx.serve(second_log, single_process=True) as second:
            sent = aidx.wait_for_item(
                lambda row: row.state == "sent", "delivery after the restart", log_path=second_log
            )
        assert second.returncode == 0
        # One more attempt, and it delivered: the item went out in exactly one association.
        assert (sent.tries, sent.files, sent.detail) == (stopped.tries + 1, len(files), "")
        study = orthanc.find_study(study_uid(small_study))
        assert study is not None
        assert orthanc.studies() == [study]
        assert orthanc.study_instance_count(study) == len(files)
        assert new_instance_changes(orthanc) == len(files)
        stored = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}
        assert stored == sop_uids(files)


def test_orthanc_pushes_a_study_that_the_node_indexes_and_completes(
    tmp_path: Path, start_node: NodeFactory, small_study: Path
) -> None:
    files = sorted(small_study.glob("*.dcm"))
    uid = study_uid(small_study)
    node = start_node(node__study_quiet_period_s=0.3)
    node_ae = node.config.node.ae_title
    with Orthanc(tmp_path / "orthanc", modalities={"AIDX": (node_ae, LOOPBACK, node.port)}) as pacs:
        assert len(pacs.upload_dir(small_study)) == len(files)
        study = pacs.find_study(uid)
        assert study is not None
        job = pacs.push_study(study, "AIDX")
    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (len(files), 0)
    indexed = node.store.study_instances(uid)
    assert {row["sop_uid"] for row in indexed} == sop_uids(files)
    assert {row["calling_ae"] for row in indexed} == {"ORTHANC"}
    wait_for(lambda: len(node.store.study_jobs(uid)) == 1, "the study to complete")
    record = node.store.study(uid)
    assert record is not None
    assert (record["state"], record["instance_count"]) == ("complete", len(files))
    [job_row] = node.store.study_jobs(uid)
    assert job_row["study_version"] == 1


def test_aidx_echo_reaches_orthanc_and_reports_a_dead_port(tmp_path: Path) -> None:
    dead_port = free_port()
    with Orthanc(tmp_path / "orthanc") as orthanc:
        aidx = AidxSetup.create(
            tmp_path / "aidx",
            destinations={
                "PACS": destination(orthanc.aet, orthanc.dicom_port),
                "GONE": destination("GONE", dead_port),
            },
        )
        answered = aidx.run("echo", "PACS")
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert f"C-ECHO ORTHANC@127.0.0.1:{orthanc.dicom_port}: success" in answered.stdout
    refused = aidx.run("echo", "GONE")
    assert refused.returncode == 1
    assert f"C-ECHO GONE@127.0.0.1:{dead_port} failed: no association" in refused.stderr
    assert "check that a DICOM service listens there" in refused.stderr
    unknown = aidx.run("echo", "NOWHERE")
    assert unknown.returncode == 2
    assert "destinations.NOWHERE: unknown destination; configured: GONE, PACS" in unknown.stderr
