"""The node's DICOMweb STOW-RS against real clients: stored as received, per-instance failures,
refusals (415, 401, 404, 413), concurrent STOWs; Orthanc's DICOMweb plugin STOWs to aidx from its
DicomWeb.Servers; and aidx's own STOW-RS to destinations (the outbox to Orthanc, `aidx send`, a
destination that is down). QIDO-RS and WADO-RS: test_dicomweb_read.py."""

from __future__ import annotations

import io
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from aidx.cli import main
from dicom_node.dicomweb.stow import read_part10
from dicom_node.export import ExportWorker
from dicom_node.service import NodeService
from tests.conftest import IN_CI
from tests.dicom_node.conftest import wait_for
from tests.dicom_node.dicomweb_node import (
    BOUNDARY,
    ORTHANC_TOKEN,
    STOW_TYPE,
    TOKENS,
    _auth,
    _copy,
    _count,
    _dataset_bytes,
    _files,
    _multipart,
    _stow,
    _url,
    analysed_study,
    dicomweb_node,
)
from tests.peers.orthanc import Orthanc, dicomweb_plugin
from tests.peers.process import ToolMissingError, free_port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    yield from dicomweb_node(tmp_path_factory)


@pytest.fixture(scope="module")
def study_uid(node: NodeService, small_study: Path) -> str:
    """The small study, stored by STOW-RS, assembled and analysed (AI SR and SEG)."""
    return analysed_study(node, small_study)


# --------------------------------------------------------------------------------------- STOW-RS
def test_stow_stores_each_instance_as_received_and_assembles_the_study(
    node: NodeService, small_study: Path
) -> None:
    files = _files(small_study)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    response = _stow(node, [f.read_bytes() for f in files])

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    assert answer.RetrieveURL == f"{_url(node)}/studies/{study_uid}"
    assert "FailedSOPSequence" not in answer
    assert len(answer.ReferencedSOPSequence) == len(files)
    # Each data set is stored byte for byte as it came, where C-STORE would store it.
    by_uid = {r["sop_uid"]: r for r in node.store.study_instances(study_uid)}
    assert len(by_uid) == len(files)
    for path in files:
        sent = path.read_bytes()
        row = by_uid[read_part10(memoryview(sent)).sop_uid]
        assert row["calling_ae"] == "pacs"
        assert _dataset_bytes(Path(row["path"]).read_bytes()) == _dataset_bytes(sent)
        assert Path(row["path"]).is_relative_to(node.spool.root / study_uid)
    # The study is assembled as a received one is: one job once it is quiet.
    wait_for(lambda: len(node.store.study_jobs(study_uid)) == 1, "the study's job")

    again = _stow(node, [files[0].read_bytes()], f"/studies/{study_uid}")
    assert again.status_code == 200, again.text
    assert _count(node, study_uid) == len(files)


def test_a_corrupt_part_is_listed_with_its_reason_and_the_others_are_stored(
    node: NodeService, small_study: Path, tmp_path: Path
) -> None:
    good = _copy(_files(small_study)[:3], tmp_path / "copy")
    study_uid = str(pydicom.dcmread(good[0]).StudyInstanceUID)
    truncated = good[1].read_bytes()[:-1000]
    parts = [good[0].read_bytes(), b"not a DICOM file at all", truncated, good[2].read_bytes()]
    response = _stow(node, parts)

    assert response.status_code == 202, response.text
    answer = pydicom.Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        str(pydicom.dcmread(p).SOPInstanceUID) for p in (good[0], good[2])
    ]
    failed = answer.FailedSOPSequence
    assert [i.FailureReason for i in failed] == [0xC000, 0xC000]
    assert failed[1].ReferencedSOPInstanceUID == str(pydicom.dcmread(good[1]).SOPInstanceUID)
    warnings = response.headers.get_list("warning")
    assert "part 2: not a DICOM Part 10 file" in warnings[0]
    assert "truncated" in warnings[1]
    assert _count(node, study_uid) == 2
    assert list(node.spool.incoming.iterdir()) == []


def test_the_complete_parts_of_a_body_cut_short_are_stored_and_the_answer_says_so(
    node: NodeService, small_study: Path, tmp_path: Path
) -> None:
    files = _copy(_files(small_study)[:3], tmp_path / "cut")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    body = _multipart([f.read_bytes() for f in files])
    cut = body[: body.rindex(BOUNDARY.encode()) - 2000]  # inside the third part
    response = httpx.post(
        f"{_url(node)}/studies", content=cut, headers={"Content-Type": STOW_TYPE, **_auth()}
    )
    assert response.status_code == 400
    assert "cut short after 2 complete parts" in response.text
    assert "of the 2 complete parts before that, 2 were stored" in response.text
    assert _count(node, study_uid) == 2


def test_an_instance_of_another_study_is_refused_by_a_study_stow(
    node: NodeService, small_study: Path, tmp_path: Path
) -> None:
    (other,) = _copy(_files(small_study)[:1], tmp_path / "other")
    target = generate_uid()
    response = _stow(node, [other.read_bytes()], f"/studies/{target}")

    assert response.status_code == 409, response.text
    (failed,) = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
    assert failed.FailureReason == 0xA900
    assert f"not of the study {target}" in response.headers["warning"]
    assert not (node.spool.root / str(pydicom.dcmread(other).StudyInstanceUID)).exists()


def test_requests_refused_with_the_status_and_reason(node: NodeService, small_study: Path) -> None:
    url, one = _url(node), _files(small_study)[0].read_bytes()
    no_token = httpx.get(f"{url}/studies")
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(f"{url}/studies", headers={"Authorization": "Bearer guessed"})
    assert wrong.status_code == 401 and "not one of dicomweb.peers" in wrong.text
    read_only = _stow(node, [one], **_auth("viewer"))
    assert read_only.status_code == 403 and "viewer may not store" in read_only.text

    wrong_type = httpx.post(
        f"{url}/studies", content=one, headers={"Content-Type": "application/dicom", **_auth()}
    )
    assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.text
    json_parts = httpx.post(
        f"{url}/studies",
        content=_multipart([b"{}"], "application/dicom+json"),
        headers={
            "Content-Type": STOW_TYPE.replace('"application/dicom"', '"application/dicom+json"'),
            **_auth(),
        },
    )
    assert json_parts.status_code == 415

    too_large = _stow(node, [one, b"\0" * (1024 * 1024)])
    assert too_large.status_code == 413 and "dicomweb.max_request_mb" in too_large.text
    cut_short = httpx.post(
        f"{url}/studies",
        content=_multipart([one])[:-20],
        headers={"Content-Type": STOW_TYPE, **_auth()},
    )
    assert cut_short.status_code == 400 and "cut short" in cut_short.text

    unknown = generate_uid()
    for path in (
        f"/studies/{unknown}",
        f"/studies/{unknown}/series",
        f"/studies/{unknown}/metadata",
    ):
        response = httpx.get(url + path, headers=_auth())
        assert response.status_code == 404, path
        assert f"no study {unknown}" in response.text
    bad_query = httpx.get(f"{url}/studies?limit=many", headers=_auth())
    assert bad_query.status_code == 400 and "limit" in bad_query.text


def test_concurrent_stows_of_the_same_instances_store_them_once(
    node: NodeService, small_study: Path, tmp_path: Path
) -> None:
    files = _copy(_files(small_study)[:4], tmp_path / "same")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    parts = [f.read_bytes() for f in files]
    start = threading.Barrier(4)
    codes: list[int] = []

    def send() -> None:
        start.wait()
        codes.append(_stow(node, parts).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert codes == [200] * 4
    assert _count(node, study_uid) == 4
    assert len(list((node.spool.root / study_uid).rglob("*.dcm"))) == 4
    study = node.store.study(study_uid)
    assert study is not None and study["instance_count"] == 4
    assert list(node.spool.incoming.iterdir()) == []


@pytest.fixture(scope="module")
def orthanc(node: NodeService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with Debian's DICOMweb plugin: aidx is in its DicomWeb.Servers (as peer
    ``orthanc``), and it serves DICOMweb at /dicom-web/."""
    try:
        plugin = dicomweb_plugin(
            {"aidx": (_url(node) + "/", {"Authorization": f"Bearer {ORTHANC_TOKEN}"})}
        )
    except ToolMissingError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with Orthanc(tmp_path_factory.mktemp("orthanc"), config=plugin) as server:
        yield server


def test_orthanc_stows_a_study_to_aidx_through_its_dicomweb_servers(
    node: NodeService, orthanc: Orthanc, small_study: Path, tmp_path: Path
) -> None:
    files = _copy(_files(small_study)[:5], tmp_path / "orthanc-study")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    orthanc.upload_dir(files[0].parent)
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None
    orthanc.stow("aidx", [study_id])

    rows = node.store.study_instances(study_uid)
    assert len(rows) == 5
    assert {r["calling_ae"] for r in rows} == {"orthanc"}
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    for row in rows:  # the pixels and UIDs as uploaded to Orthanc
        stored = pydicom.dcmread(row["path"])
        assert stored.PixelData == pydicom.dcmread(sent[row["sop_uid"]]).PixelData


def _outbox(node: NodeService, destinations: dict[str, Any], **outbox: Any) -> ExportWorker:
    """An export worker on the module node's store with these destinations."""
    config = node.config.model_copy(deep=True)
    config.destinations = destinations
    for key, value in outbox.items():
        setattr(config.outbox, key, value)
    return ExportWorker(config, node.store)


def test_the_outbox_sends_the_results_to_orthanc_by_stow_rs_once(
    node: NodeService, orthanc: Orthanc, study_uid: str
) -> None:
    (result,) = node.store.study_results(study_uid)
    files = [result["sr_path"], result["seg_path"]]
    worker = _outbox(node, {"pacs-web": {"dicomweb": f"{orthanc.url}/dicom-web"}})
    first, _ = node.store.enqueue("pacs-web", "dicomweb-test:1", files, study_uid)
    again, _ = node.store.enqueue("pacs-web", "dicomweb-test:2", files, study_uid)
    assert worker.deliver_due() == 2

    states = {i.id: i for i in node.store.outbox_items()}
    assert states[first].state == states[again].state == "sent", states
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None
    instances = orthanc.get(f"/studies/{study_id}/instances")
    by_uid = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}
    assert len(instances) == 2  # sent twice, kept once
    seg_uid = str(pydicom.dcmread(result["seg_path"]).SOPInstanceUID)
    assert set(by_uid) == {result["sr_sop_uid"], seg_uid}
    request = urllib.request.Request(f"{orthanc.url}/instances/{by_uid[seg_uid]}/file")
    with urllib.request.urlopen(request, timeout=30) as response:
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.read())))
    assert seg.number_of_segments == result["finding_count"]


def test_aidx_send_stows_files_to_a_dicomweb_destination_with_its_bearer_token(
    node: NodeService, small_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _copy(_files(small_study)[:2], tmp_path / "send")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    config = tmp_path / "aidx.yaml"
    web = {"dicomweb": _url(node), "auth": {"bearer_token": TOKENS["pacs"]}}
    wrong = {"dicomweb": _url(node), "auth": {"bearer_token": "guessed"}}
    config.write_text(
        yaml.safe_dump(
            {"data_dir": str(tmp_path / "data"), "destinations": {"web": web, "wrong": wrong}}
        ),
        encoding="utf-8",
    )
    assert main(["--config", str(config), "send", str(files[0].parent), "--to", "web"]) == 0
    assert "sent 2 files to web by STOW-RS" in capsys.readouterr().out
    assert _count(node, study_uid) == 2
    assert main(["--config", str(config), "send", str(files[0]), "--to", "wrong"]) != 0
    assert "refused the credentials (HTTP 401): check destinations.wrong.auth" in (
        capsys.readouterr().err
    )
    assert main(["--config", str(config), "echo", "web"]) != 0
    assert "C-ECHO needs a DICOM AE" in capsys.readouterr().err


def test_a_dicomweb_destination_that_is_down_is_retried_then_listed_as_failed(
    node: NodeService, study_uid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (result,) = node.store.study_results(study_uid)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    worker = _outbox(node, {"down-web": {"dicomweb": down}}, max_attempts=2)
    item_id, _ = node.store.enqueue("down-web", "dicomweb-test:down", [result["sr_path"]])

    def failed_for_good() -> bool:
        worker.deliver_due()
        item = next(i for i in node.store.outbox_items() if i.id == item_id)
        return item.state == "failed"

    wait_for(failed_for_good, "two attempts at a destination that is down")
    item = next(i for i in node.store.outbox_items() if i.id == item_id)
    assert item.attempts == 2
    assert f"STOW-RS to down-web ({down}/studies) failed" in str(item.last_error)
    assert (
        main(["--data-dir", str(node.config.data_dir), "outbox", "list", "--state", "failed"]) == 0
    )
    listed = capsys.readouterr().out
    assert "down-web" in listed and "STOW-RS to down-web" in listed
