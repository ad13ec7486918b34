"""The node's DICOMweb service against real clients: the Python ``dicomweb-client`` (STOW-RS,
QIDO-RS, WADO-RS, results read back with highdicom), Orthanc's DICOMweb plugin (STOW-RS from
its DicomWeb.Servers; and the outbox's STOW-RS of aidx's results to it), and bad requests made by
hand with httpx.

One node serves the whole module (module-scoped), with three peers: ``pacs`` (store and read),
``viewer`` (read only) and ``orthanc``.
"""

from __future__ import annotations

import hashlib
import io
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import yaml
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from aidx.cli import main
from aidx.pipeline.worker import Worker
from dicom_node.dicomweb import wado
from dicom_node.dicomweb.catalog import Entry
from dicom_node.dicomweb.stow import read_part10
from dicom_node.export import ExportWorker
from dicom_node.service import NodeService
from tests.conftest import IN_CI
from tests.dicom_node.conftest import node_config, wait_for
from tests.peers.orthanc import Orthanc, dicomweb_plugin
from tests.peers.process import ToolMissingError, free_port
from tests.standin_model import install
from ui.accounts import Accounts
from ui.review import Reviews
from ui.signoff import sign

TOKENS = {"pacs": "pacs-token-0123456789", "viewer": "viewer-token-0123456789"}
ORTHANC_TOKEN = "orthanc-token-0123456789"
BOUNDARY = "aidx-test-boundary"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    root = tmp_path_factory.mktemp("dicomweb")
    models = root / "models"
    model = install(models, root)
    config = node_config(
        root / "data",
        dicomweb__port=free_port(),
        dicomweb__max_request_mb=1,
        dicomweb__peers=[
            {"name": "pacs", "token_sha256": _sha(TOKENS["pacs"])},
            {"name": "viewer", "token_sha256": _sha(TOKENS["viewer"]), "store": False},
            {"name": "orthanc", "token_sha256": _sha(ORTHANC_TOKEN), "read": False},
        ],
        models__dir=str(models),
        models__default=model,
        inference__providers=["CPUExecutionProvider"],
        inference__min_volume_mm3=1000,
        inference__series__min_slices=8,
    )
    service = NodeService(config, outbox=False)  # each test's own outbox delivers (`_outbox`)
    service.start()
    yield service
    service.stop()
    service.store.close()


def _url(node: NodeService) -> str:
    assert node.dicomweb is not None
    return node.dicomweb.url


def _auth(peer: str = "pacs") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[peer]}"}


def _client(node: NodeService, peer: str = "pacs") -> DICOMwebClient:
    return DICOMwebClient(url=_url(node), headers=_auth(peer))


def _multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    body = b"".join(
        b"\r\n--" + BOUNDARY.encode() + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p
        for p in parts
    )
    return body + b"\r\n--" + BOUNDARY.encode() + b"--\r\n"


DICOM_PARTS = 'multipart/related; type="application/dicom"'
STOW_TYPE = f"{DICOM_PARTS}; boundary={BOUNDARY}"


def _stow(
    node: NodeService, parts: list[bytes], path: str = "/studies", **headers: str
) -> httpx.Response:
    return httpx.post(
        _url(node) + path,
        content=_multipart(parts),
        headers={"Content-Type": STOW_TYPE, **_auth(), **headers},
        timeout=60,
    )


def _copy(files: list[Path], out: Path) -> list[Path]:
    """The study again under new study, series and instance UIDs (a study not yet stored)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _files(small_study: Path) -> list[Path]:
    return sorted(small_study.glob("*.dcm"))


def _dataset_bytes(data: bytes) -> bytes:
    return data[read_part10(memoryview(data)).dataset_offset :]


def _count(node: NodeService, study_uid: str) -> int:
    return len(node.store.study_instances(study_uid))


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


# --------------------------------------------------------------------------- QIDO-RS and WADO-RS
@pytest.fixture(scope="module")
def study_uid(node: NodeService, small_study: Path) -> str:
    """The small study, stored by STOW-RS, assembled and analysed (AI SR and SEG)."""
    files = _files(small_study)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    if _count(node, uid) < len(files):
        assert _stow(node, [f.read_bytes() for f in files]).status_code == 200
    wait_for(lambda: len(node.store.study_jobs(uid)) >= 1, "the study's job")
    assert Worker(node.config, node.store).run_once()
    (result,) = node.store.study_results(uid)
    assert result["seg_path"] is not None
    return uid


def test_qido_finds_studies_series_and_instances_with_filters_and_paging(
    node: NodeService, study_uid: str, small_study: Path
) -> None:
    client = _client(node, "viewer")
    header = pydicom.dcmread(_files(small_study)[0], stop_before_pixels=True)

    # The module's other studies are copies of this one, for the same patient.
    same_patient = [
        pydicom.Dataset.from_json(s)
        for s in client.search_for_studies(search_filters={"PatientID": header.PatientID})
    ]
    assert study_uid in {s.StudyInstanceUID for s in same_patient}
    assert {s.PatientID for s in same_patient} == {header.PatientID}
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    (study,) = client.search_for_studies(
        search_filters={"PatientID": header.PatientID, "StudyInstanceUID": study_uid}
    )
    found = pydicom.Dataset.from_json(study)
    assert found.PatientID == header.PatientID
    assert found.StudyInstanceUID == study_uid
    assert set(found.ModalitiesInStudy) == {"CT", "SR", "SEG"}
    assert found.NumberOfStudyRelatedSeries == 3
    assert found.RetrieveURL == f"{_url(node)}/studies/{study_uid}"
    day = str(header.StudyDate)
    assert client.search_for_studies(search_filters={"StudyDate": f"{day}-{day}"})
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    assert client.search_for_studies(
        search_filters={"ModalitiesInStudy": "SEG", "StudyInstanceUID": study_uid}
    )
    name = str(header.PatientName)
    assert client.search_for_studies(search_filters={"PatientName": name[:3].lower() + "*"})

    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "SEG", "SR"]
    ct = next(s for s in series if s.Modality == "CT")
    assert ct.NumberOfSeriesRelatedInstances == 12

    page = client.search_for_instances(
        study_uid, ct.SeriesInstanceUID, offset=10, limit=5, fields=["SliceThickness"]
    )
    assert len(page) == 2
    item = pydicom.Dataset.from_json(page[0])
    assert item.SliceThickness == header.SliceThickness  # read from the file's header
    assert item.SOPClassUID == CT_IMAGE

    response = httpx.get(
        f"{_url(node)}/studies?PatientID={header.PatientID}&NoSuchAttribute=1", headers=_auth()
    )
    assert response.status_code == 400
    ignored = httpx.get(
        f"{_url(node)}/studies?PatientID={header.PatientID}&PatientWeight=70", headers=_auth()
    )
    assert ignored.status_code == 200 and len(ignored.json()) == len(same_patient)
    assert "PatientWeight" in ignored.headers["warning"]


def test_wado_returns_the_files_as_stored_metadata_and_frames(
    node: NodeService, study_uid: str, small_study: Path
) -> None:
    client = _client(node, "viewer")
    files = _files(small_study)
    datasets = client.retrieve_study(study_uid)
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    images = [d for d in datasets if d.Modality == "CT"]
    assert {d.SOPInstanceUID for d in images} == set(sent)
    for ds in images:
        assert ds.PixelData == pydicom.dcmread(sent[ds.SOPInstanceUID]).PixelData

    first = pydicom.dcmread(files[0])
    metadata = client.retrieve_series_metadata(study_uid, first.SeriesInstanceUID)
    assert len(metadata) == 12
    one = pydicom.Dataset.from_json(metadata[0])
    assert "PixelData" not in one and one.AvailableTransferSyntaxUID == str(
        first.file_meta.TransferSyntaxUID
    )
    (frame,) = client.retrieve_instance_frames(
        study_uid, first.SeriesInstanceUID, first.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == first.PixelData

    refused = httpx.get(
        f"{_url(node)}/studies/{study_uid}",
        headers={
            "Accept": f"{DICOM_PARTS}; transfer-syntax=1.2.840.10008.1.2.4.50",
            **_auth(),
        },
    )
    assert refused.status_code == 406 and "as stored" in refused.text


def test_the_ai_results_are_served_with_their_study_and_read_back_by_highdicom(
    node: NodeService, study_uid: str
) -> None:
    client = _client(node, "viewer")
    series = {
        pydicom.Dataset.from_json(s).Modality: pydicom.Dataset.from_json(s)
        for s in client.search_for_series(study_uid)
    }
    (sr_data,) = client.retrieve_series(study_uid, series["SR"].SeriesInstanceUID)
    (seg_data,) = client.retrieve_series(study_uid, series["SEG"].SeriesInstanceUID)
    (result,) = node.store.study_results(study_uid)

    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_data)
    assert sr.SOPInstanceUID == result["sr_sop_uid"]
    groups = sr.content.get_planar_roi_measurement_groups() + list(
        sr.content.get_volumetric_roi_measurement_groups()
    )
    assert len(groups) == result["finding_count"] >= 1
    seg = hd.seg.Segmentation.from_dataset(seg_data)
    assert seg.number_of_segments == result["finding_count"]
    # The files go out as aidx wrote them.
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg_data, enforce_file_format=True)
    assert seg_data.PixelData == pydicom.dcmread(result["seg_path"]).PixelData
    # A binary SEG's frame, as a viewer's SEG loader fetches it: from bit 0 of its first byte.
    last = int(seg.NumberOfFrames)  # past the first byte boundary unless frames are whole bytes
    (frame,) = client.retrieve_instance_frames(
        study_uid, series["SEG"].SeriesInstanceUID, seg.SOPInstanceUID, frame_numbers=[last]
    )
    bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
    pixels = bits[: seg.Rows * seg.Columns].reshape(seg.Rows, seg.Columns)
    assert np.array_equal(pixels, seg.get_stored_frame(last))
    meta = client.retrieve_instance_metadata(
        study_uid, series["SR"].SeriesInstanceUID, result["sr_sop_uid"]
    )
    assert pydicom.Dataset.from_json(meta).ContentSequence  # the report's content, as JSON


# ------------------------------------------------------------------- STOW-RS to a destination
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


def test_a_one_bit_frame_starts_at_bit_0_of_its_own_bytes(tmp_path: Path) -> None:
    """3 x 3 binary frames share bytes in the file (9 bits each); each is served on its own."""
    first = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.uint8)
    second = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 3, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 1, 1, 0, 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    packed = np.packbits(np.concatenate([first.ravel(), second.ravel()]), bitorder="little")
    ds.PixelData = packed.tobytes()
    path = tmp_path / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    entry = Entry(
        study_uid="1",
        series_uid="2",
        sop_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax=pydicom.uid.ExplicitVRLittleEndian,
        instance_number=1,
        path=str(path),
        modality="SEG",
        series_number=1,
        series_description="",
    )

    for number, expected in ((1, first), (2, second)):
        (frame,) = wado.frames(entry, [number])
        bits = np.unpackbits(np.frombuffer(frame.data, np.uint8), bitorder="little")[:9]
        assert np.array_equal(bits.reshape(3, 3), expected), number


def test_a_signed_report_is_served_as_a_series_of_its_study(
    node: NodeService, study_uid: str
) -> None:
    """Runs last: it adds the radiologist's signed SR to the analysed study."""
    accounts = Accounts(node.store)
    radiologist = accounts.add_user(
        "rad",
        "correct horse battery",
        role="radiologist",
        display_name="Smith^Anna",
        organisation="General Hospital",
    )
    reviews = Reviews(node.store, accounts.audit)
    (row,) = [w for w in reviews.worklist() if w.study_uid == study_uid]
    for finding in reviews.findings(row.review_id):
        reviews.decide(row.review_id, finding.key, "accept", radiologist)
    signed = sign(reviews, node.store, row.review_id, radiologist, node.config.data_dir / "signed")

    client = _client(node, "viewer")
    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study_uid)]
    reports = [s for s in series if s.Modality == "SR"]
    assert len(reports) == 2  # the AI's and the radiologist's
    found = [
        d
        for s in reports
        for d in client.retrieve_series(study_uid, s.SeriesInstanceUID)
        if d.SOPInstanceUID == signed.sr_uid
    ]
    (report,) = found
    assert report.VerificationFlag == "VERIFIED"
    assert hd.sr.Comprehensive3DSR.from_dataset(report).SOPInstanceUID == signed.sr_uid
