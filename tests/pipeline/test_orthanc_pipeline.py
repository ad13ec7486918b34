"""The whole pipeline with a real Orthanc as the PACS: Orthanc (or DCMTK storescu) sends studies
to `aidx serve` (a separate process), which assembles them, runs the stand-in model and sends
the SR and SEG back to Orthanc, into the same study.

What a PACS engineer relies on, end to end: the results match `aidx infer` on the same files;
a crash of aidx (kill -9) in the middle of a job reruns it and delivers once; a PACS that is
down is retried until it is back, then delivered once; a study without an eligible series says
why and sends nothing; late images make a second version that names the first as its
predecessor; ten studies at once all come back, and an urgent one overtakes the routine queue.
Every wait is a bounded poll on the store or Orthanc, with the `aidx serve` log on failure.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from inference.sr import LONG_AXIS, VOLUME, finding_groups
from tests.enhanced_ct import write_enhanced_ct
from tests.inference.results_case import dciodvfy_errors
from tests.peers import LOOPBACK, peer_env, storescu, storescu_command
from tests.pipeline.conftest import PipelineFactory
from tests.pipeline.harness import (
    JOB_DEADLINE_S,
    NODE_AET,
    PACS,
    SLOW_OVERLAP,
    downloads,
    instance_counts,
    instance_ids,
    push,
    study_series,
    study_uid,
    upload_and_push,
)

pytestmark = pytest.mark.external

# States in which a job stays (results_ready is passed on the way to sent).
SETTLED = ("sent", "failed", "not_applicable", "superseded")
HAPPY_TIMELINE = [
    "complete",
    "inference_started",
    "inference_done",
    "send_queued",
    "results_ready",
    "sent",  # the destination acknowledged the item ...
    "sent",  # ... and with that, every destination of the job
]


def report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    """An SR read with highdicom, and its TID 1500 content."""
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR), type(sr)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr, sr.content


def key_slice(group: Any) -> str:
    """The image a group's long axis is drawn on (its SCOORD's source)."""
    (long_axis,) = group.get_measurements(name=LONG_AXIS)
    (line,) = long_axis.referenced_coordinates
    return str(line.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def tracking_uids(content: hd.sr.MeasurementReport) -> dict[str, str]:
    """Tracking identifier -> tracking UID of every measurement group."""
    return {str(g.tracking_identifier): str(g.tracking_uid) for g in finding_groups(content)}


def segment_tracking_uids(path: Path) -> dict[str, str]:
    """Tracking identifier -> tracking UID of every segment of a SEG read with highdicom."""
    seg = hd.seg.segread(path)
    out = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        out[str(description.tracking_id)] = str(description.tracking_uid)
    return out


def event_names(status: dict[str, Any]) -> list[str]:
    return [str(e["event"]) for e in status["events"]]


def sent_events(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The events that record an acknowledgement by the destination (one per delivery)."""
    return [e for e in status["events"] if e["event"] == "sent" and e["detail"] == PACS]


def test_a_study_from_orthanc_comes_back_as_sr_and_seg_matching_aidx_infer(
    tmp_path: Path, new_pipeline: PipelineFactory, chest_study: Path
) -> None:
    files = sorted(chest_study.glob("*.dcm"))
    pipeline = new_pipeline()
    with pipeline.pacs(tmp_path / "orthanc") as orthanc, pipeline.serving():
        uid = upload_and_push(orthanc, chest_study)
        job = pipeline.wait_for_job(uid, SETTLED, deadline_s=JOB_DEADLINE_S)
        assert job["state"] == "sent", job
        series = study_series(orthanc, uid)
        (sr_path,) = downloads(orthanc, uid, "SR", tmp_path / "from-pacs")
        (seg_path,) = downloads(orthanc, uid, "SEG", tmp_path / "from-pacs")
        status = pipeline.status(uid)
    # Orthanc holds the study as sent plus one SR and one SEG, in the same study.
    assert instance_counts(series) == {"CT": len(files), "SR": 1, "SEG": 1}

    # The same files through `aidx infer`, with the same configuration.
    infer_out = tmp_path / "infer"
    done = pipeline.aidx.run("infer", str(chest_study), "--out", str(infer_out))
    assert done.returncode == 0, done.stdout + done.stderr
    local = json.loads((infer_out / "findings.json").read_text(encoding="utf-8"))
    findings = local["findings"]
    assert findings, "the stand-in model flags soft tissue: it must find something"
    local_sr, local_content = report(infer_out / "sr.dcm")

    sr, content = report(sr_path)
    assert sr.StudyInstanceUID == uid
    # Study version 1 keeps the UIDs of `aidx infer`: the same object, wherever it was made.
    assert sr.SOPInstanceUID == local_sr.SOPInstanceUID
    groups = {str(g.tracking_identifier): g for g in finding_groups(content)}
    assert sorted(groups) == sorted(f"Nodule {f['id']}" for f in findings)
    assert tracking_uids(content) == tracking_uids(local_content)
    for finding in findings:
        group = groups[f"Nodule {finding['id']}"]
        assert key_slice(group) == finding["key_sop_instance_uid"]
        (volume,) = group.get_measurements(name=VOLUME)
        assert volume.value == pytest.approx(finding["volume_mm3"], abs=0.01)
    # The SEG's segments carry the SR's tracking identifiers and UIDs.
    assert segment_tracking_uids(seg_path) == tracking_uids(content)
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == uid

    # `aidx status UID --json`: the whole timeline of one job, one result, one delivery.
    assert (status["state"], status["version"], status["instances"]) == (
        "complete",
        1,
        len(files),
    )
    assert status["calling_ae"] == "ORTHANC"
    (job_status,) = status["jobs"]
    assert event_names(status) == HAPPY_TIMELINE
    assert {e["job_id"] for e in status["events"]} == {job_status["id"]}
    offsets = [e["offset_s"] for e in status["events"]]
    assert offsets == sorted(offsets) and offsets[0] >= 0, offsets
    assert (job_status["state"], job_status["attempts"], job_status["model"]) == (
        "sent",
        1,
        "soft-tissue@0.0.1",
    )
    (result,) = status["results"]
    assert result["findings"] == len(findings)
    served = json.loads(Path(result["findings_path"]).read_text(encoding="utf-8"))
    assert served == local  # the worker's findings.json is the one `aidx infer` writes
    (delivery,) = status["destinations"]
    assert (delivery["destination"], delivery["state"], delivery["attempts"]) == (PACS, "sent", 1)
    assert (delivery["files"], delivery["last_error"]) == (2, None)


def test_an_enhanced_ct_from_orthanc_gets_the_findings_of_its_single_frame_series(
    tmp_path: Path, new_pipeline: PipelineFactory, chest_study: Path
) -> None:
    """The chest study as one Enhanced CT Image Storage instance through Orthanc: the same
    findings as the single-frame series through `aidx infer`, and results that name the
    instance's frames. (`aidx infer` is tested on Legacy Converted Enhanced CT too.)"""
    study = tmp_path / "multiframe"
    write_enhanced_ct(chest_study, study / "ct.dcm")
    pipeline = new_pipeline()
    with pipeline.pacs(tmp_path / "orthanc") as orthanc, pipeline.serving():
        uid = upload_and_push(orthanc, study)
        job = pipeline.wait_for_job(uid, SETTLED, deadline_s=JOB_DEADLINE_S)
        assert job["state"] == "sent", job
        (sr_path,) = downloads(orthanc, uid, "SR", tmp_path / "from-pacs")
        (seg_path,) = downloads(orthanc, uid, "SEG", tmp_path / "from-pacs")
        (result,) = pipeline.store.study_results(uid)
    single = tmp_path / "single"
    done = pipeline.aidx.run("infer", str(chest_study), "--out", str(single))
    assert done.returncode == 0, done.stdout + done.stderr
    expected = json.loads((single / "findings.json").read_text(encoding="utf-8"))["findings"]
    found = json.loads(Path(result["findings_path"]).read_text(encoding="utf-8"))["findings"]
    assert expected
    fields = ("id", "probability", "center_mm", "diameter_mm", "volume_mm3", "bbox_mm")
    assert [{k: f[k] for k in fields} for f in found] == [
        {k: f[k] for k in fields} for f in expected
    ]
    # The key slice of each finding is a frame of the one instance, the frame whose position
    # is that of the single-frame key slice.
    instance = pydicom.dcmread(study / "ct.dcm", stop_before_pixels=True)
    positions = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): [
            float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient
        ]
        for f in chest_study.glob("*.dcm")
    }
    for f, single_f in zip(found, expected, strict=True):
        assert f["key_sop_instance_uid"] == instance.SOPInstanceUID
        frame = instance.PerFrameFunctionalGroupsSequence[f["key_frame_number"] - 1]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(positions[single_f["key_sop_instance_uid"]])
    # The SR draws each long axis on that frame; the SEG's frames reference the instance's.
    _, content = report(sr_path)
    groups = {str(g.tracking_identifier): g for g in finding_groups(content)}
    for f in found:
        (long_axis,) = groups[f"Nodule {f['id']}"].get_measurements(name=LONG_AXIS)
        (line,) = long_axis.referenced_coordinates
        source = line.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == instance.SOPInstanceUID
        assert int(source.ReferencedFrameNumber) == f["key_frame_number"]
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == instance.SOPInstanceUID
        assert 1 <= int(source.ReferencedFrameNumber) <= int(instance.NumberOfFrames)
    for path in (sr_path, seg_path):
        assert dciodvfy_errors(path) == []


def test_kill_9_during_a_job_reruns_it_after_a_restart_and_delivers_once(
    tmp_path: Path, new_pipeline: PipelineFactory, chest_study: Path
) -> None:
    pipeline = new_pipeline(overlap=SLOW_OVERLAP)  # the job runs for seconds
    with pipeline.pacs(tmp_path / "orthanc") as orthanc:
        with pipeline.serving():
            uid = upload_and_push(orthanc, chest_study)
            pipeline.wait_for_job(uid, ("running",))
            pipeline.kill()
        (killed,) = pipeline.jobs(uid)
        assert (killed["state"], killed["attempts"]) == ("running", 1), killed
        assert instance_ids(orthanc, uid, "SR") == []

        with pipeline.serving():
            job = pipeline.wait_for_job(uid, SETTLED, deadline_s=JOB_DEADLINE_S)
            assert job["state"] == "sent", job
            status = pipeline.status(uid)
        sr_ids = instance_ids(orthanc, uid, "SR")
        seg_ids = instance_ids(orthanc, uid, "SEG")
    assert (len(sr_ids), len(seg_ids)) == (1, 1)

    (job_status,) = status["jobs"]
    assert (job_status["state"], job_status["attempts"]) == ("sent", 2)
    assert event_names(status) == [
        "complete",
        "inference_started",
        "requeued",
        "inference_started",
        *HAPPY_TIMELINE[2:],
    ]
    (requeued,) = [e for e in status["events"] if e["event"] == "requeued"]
    assert requeued["job_id"] == job_status["id"]
    assert f":{killed['worker'].split(':')[1]}:" in requeued["detail"]  # the dead process
    assert "is gone" in requeued["detail"]
    # Delivered once: one outbox item, acknowledged at its first attempt.
    (delivery,) = status["destinations"]
    assert (delivery["state"], delivery["attempts"]) == ("sent", 1)
    assert len(sent_events(status)) == 1


def test_a_pacs_that_is_down_gets_the_results_once_it_is_back(
    tmp_path: Path, new_pipeline: PipelineFactory, chest_study: Path
) -> None:
    files = sorted(chest_study.glob("*.dcm"))
    pipeline = new_pipeline(overlap=SLOW_OVERLAP)  # Orthanc needs ~2 s to stop
    orthanc = pipeline.pacs(tmp_path / "orthanc")
    with orthanc, pipeline.serving():
        uid = upload_and_push(orthanc, chest_study)
        pipeline.wait_for_job(uid, ("queued", "running"))  # the study is complete in aidx
        orthanc.stop()
        assert "sent" not in pipeline.events(uid), "delivered before Orthanc was down"
        pipeline.wait(
            lambda: pipeline.events(uid).count("send_retry") >= 2,
            "two failed deliveries to the stopped Orthanc",
            JOB_DEADLINE_S,
            seen=lambda: pipeline.events(uid),
        )
        down = pipeline.status(uid)
        assert [j["state"] for j in down["jobs"]] == ["results_ready"]
        (waiting,) = down["destinations"]
        # Retried every second while Orthanc is down: the item may be in an attempt right now.
        assert waiting["state"] in ("pending", "sending"), waiting
        assert waiting["attempts"] >= 2, waiting
        assert (
            f"ORTHANC@127.0.0.1:{pipeline.pacs_port} aborted or unreachable"
            in (waiting["last_error"])
        )

        orthanc.start()  # the same storage and ports
        job = pipeline.wait_for_job(uid, SETTLED, deadline_s=JOB_DEADLINE_S)
        assert job["state"] == "sent", job
        status = pipeline.status(uid)
        assert len(instance_ids(orthanc, uid, "CT")) == len(files)
        sr_ids = instance_ids(orthanc, uid, "SR")
        seg_ids = instance_ids(orthanc, uid, "SEG")
    assert (len(sr_ids), len(seg_ids)) == (1, 1)

    names = event_names(status)
    retries = names.count("send_retry")
    assert retries >= 2
    assert names == [*HAPPY_TIMELINE[:5], *["send_retry"] * retries, "sent", "sent"]
    (delivery,) = status["destinations"]
    assert (delivery["state"], delivery["attempts"]) == ("sent", retries + 1)
    assert delivery["last_error"] is None
    assert len(sent_events(status)) == 1


def test_a_study_without_an_eligible_series_is_not_applicable_and_nothing_is_sent(
    tmp_path: Path, new_pipeline: PipelineFactory, short_study: Path
) -> None:
    pipeline = new_pipeline()  # inference.series.min_slices 20; the study has 10 slices
    with pipeline.pacs(tmp_path / "orthanc") as orthanc, pipeline.serving():
        uid = upload_and_push(orthanc, short_study)
        job = pipeline.wait_for_job(uid, SETTLED, deadline_s=JOB_DEADLINE_S)
        status = pipeline.status(uid)
        text = pipeline.status_text(uid)
        listing = pipeline.status_text()
        series = study_series(orthanc, uid)
    assert job["state"] == "not_applicable", job
    reason = job["reason"]
    assert reason.startswith("route default: no eligible series: series "), reason
    assert "10 slices, fewer than 20" in reason

    (job_status,) = status["jobs"]
    assert (job_status["state"], job_status["reason"]) == ("not_applicable", reason)
    assert event_names(status) == ["complete", "inference_started", "not_applicable"]
    assert status["events"][-1]["detail"] == reason
    assert (status["results"], status["destinations"]) == ([], [])
    assert reason in text  # the timeline shows why
    (row,) = [line for line in listing.splitlines() if line.startswith(uid)]
    assert "not_applicable" in row and "10 slices, fewer than 20" in row
    # Nothing queued, so nothing will be sent; Orthanc has only the images it sent.
    assert pipeline.store.outbox_items() == []
    assert sorted(series) == ["CT"]


def test_late_images_make_a_second_version_whose_sr_names_the_first(
    tmp_path: Path, new_pipeline: PipelineFactory, chest_study: Path
) -> None:
    files = sorted(chest_study.glob("*.dcm"))
    half = len(files) // 2
    pipeline = new_pipeline(min_slices=10)  # the first half alone is a readable series
    with pipeline.pacs(tmp_path / "orthanc") as orthanc, pipeline.serving():
        ids = orthanc.upload_dir(chest_study)  # in file order: slice order
        uid = study_uid(chest_study)
        push(orthanc, ids[:half])
        first = pipeline.wait_for_job(uid, SETTLED, version=1, deadline_s=JOB_DEADLINE_S)
        assert first["state"] == "sent", first
        push(orthanc, ids[half:])
        second = pipeline.wait_for_job(uid, SETTLED, version=2, deadline_s=JOB_DEADLINE_S)
        assert second["state"] == "sent", second
        status = pipeline.status(uid)
        sr_paths = downloads(orthanc, uid, "SR", tmp_path / "from-pacs")
        seg_ids = instance_ids(orthanc, uid, "SEG")
    assert (status["state"], status["version"], status["instances"]) == (
        "complete",
        2,
        len(files),
    )
    assert [(j["study_version"], j["state"]) for j in status["jobs"]] == [(1, "sent"), (2, "sent")]
    assert event_names(status) == HAPPY_TIMELINE * 2

    # Both reports reached Orthanc, as different objects; so did both segmentations.
    assert len(sr_paths) == 2 and len(seg_ids) == 2
    reports = {int(hd.sr.srread(p).InstanceNumber): p for p in sr_paths}
    old, _ = report(reports[1])
    new, _ = report(reports[2])
    assert old.SOPInstanceUID != new.SOPInstanceUID
    v1, v2 = pipeline.store.study_results(uid)
    assert (old.SOPInstanceUID, new.SOPInstanceUID) == (v1["sr_sop_uid"], v2["sr_sop_uid"])
    # Each version reports on the images it had (and names its own SEG).
    for sr, count in ((old, half), (new, len(files))):
        classes = [sop_class for *_, sop_class in sr.get_evidence()]
        assert classes.count("1.2.840.10008.5.1.4.1.1.2") == count  # CT Image Storage
        assert classes.count("1.2.840.10008.5.1.4.1.1.66.4") == 1  # Segmentation Storage
    # The new report supersedes the old one (Predecessor Documents, PS3.3 C.17.2.3).
    assert "PredecessorDocumentsSequence" not in old
    (predecessor,) = new.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == uid
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        old.SOPClassUID,
        old.SOPInstanceUID,
    )


def test_ten_studies_all_come_back_and_an_urgent_one_overtakes_the_routine_queue(
    tmp_path: Path, new_pipeline: PipelineFactory, queue_studies: list[Path]
) -> None:
    routine, urgent = queue_studies[:9], queue_studies[9]
    uids = [study_uid(folder) for folder in queue_studies]
    urgent_uid = uids[9]
    pipeline = new_pipeline(
        workers=1,
        priority_rules=[{"priority": 10, "calling_ae_titles": ["ER_CT"]}],
    )
    with pipeline.pacs(tmp_path / "orthanc") as orthanc, pipeline.serving():
        # Nine routine studies from the ward in three parallel associations, then the ER's.
        senders = [
            subprocess.Popen(
                storescu_command(
                    LOOPBACK,
                    pipeline.node_port,
                    routine[n : n + 3],
                    called_aet=NODE_AET,
                    calling_aet="WARD",
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
            for n in range(0, 9, 3)
        ]
        for sender in senders:
            output, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, output.decode(errors="replace")
        storescu(LOOPBACK, pipeline.node_port, [urgent], called_aet=NODE_AET, calling_aet="ER_CT")

        def states() -> list[str | None]:
            return [pipeline.job_state(uid) for uid in uids]

        pipeline.wait(
            lambda: all(state in SETTLED for state in states()),
            "ten jobs to settle",
            deadline_s=2 * JOB_DEADLINE_S,
            seen=states,
        )
        listing = pipeline.status()
        series = {uid: study_series(orthanc, uid) for uid in uids}
    jobs = {uid: pipeline.jobs(uid) for uid in uids}

    # Every study came back: one SR and one SEG in Orthanc, filed under the study's UID.
    for uid in uids:
        (job,) = jobs[uid]
        assert job["state"] == "sent", job
        assert instance_counts(series[uid]) == {"SR": 1, "SEG": 1}, uid
    studies = {s["study_uid"]: s for s in listing["studies"]}
    assert sorted(studies) == sorted(uids)
    assert {uid: s["job_state"] for uid, s in studies.items()} == dict.fromkeys(uids, "sent")
    assert {uid: (s["calling_ae"], s["priority"]) for uid, s in studies.items()} == {
        uid: ("ER_CT", 10) if uid == urgent_uid else ("WARD", 0) for uid in uids
    }

    # The urgent job was queued behind routine jobs that had not started yet, and finished
    # before every one of them (one worker: it ran next, after the job already running).
    (urgent_job,) = jobs[urgent_uid]
    routine_jobs = [jobs[uid][0] for uid in uids[:9]]
    waiting = [j for j in routine_jobs if j["started_at"] > urgent_job["created_at"]]
    timings = [(j["id"], j["created_at"], j["started_at"], j["finished_at"]) for j in routine_jobs]
    assert len(waiting) >= 3, f"too few routine jobs were waiting to show the order: {timings}"
    for job in waiting:
        assert urgent_job["finished_at"] < job["finished_at"], (urgent_job, timings)
        assert urgent_job["started_at"] < job["started_at"], (urgent_job, timings)
