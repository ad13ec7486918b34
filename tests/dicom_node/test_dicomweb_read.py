"""The node's DICOMweb QIDO-RS and WADO-RS against real clients: the Python ``dicomweb-client``
finds and reads the stored images and aidx's results (AI SR/SEG, signed SR), read back with
highdicom. STOW-RS: test_dicomweb_stow.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.dicomweb import wado
from dicom_node.dicomweb.catalog import Entry
from dicom_node.service import NodeService
from tests.dicom_node.dicomweb_node import (
    CT_IMAGE,
    DICOM_PARTS,
    STOW_TYPE,
    _auth,
    _client,
    _files,
    _multipart,
    _url,
    analysed_study,
    dicomweb_node,
)
from ui.accounts import Accounts
from ui.review import Reviews
from ui.signoff import sign


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    yield from dicomweb_node(tmp_path_factory)


@pytest.fixture(scope="module")
def study_uid(node: NodeService, small_study: Path) -> str:
    """The small study, stored by STOW-RS, assembled and analysed (AI SR and SEG)."""
    return analysed_study(node, small_study)


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


# ---------------------------------------------------------------------------------- people
def test_a_person_reads_with_the_review_app_session_and_never_stores(
    node: NodeService, study_uid: str, small_study: Path
) -> None:
    """The review app's session cookie (a browser sends it to every port of the host) lets a
    radiologist or an engineer search and retrieve; no one stores as a person; an admin, a
    signed-out session and no credentials are refused with the reason."""
    from dicom_node.dicomweb.access import SESSION_COOKIE
    from ui.web import COOKIE

    assert SESSION_COOKIE == COOKIE  # the cookie the review app sets is the one read here
    accounts = Accounts(node.store)
    for name, role in (("web-rad", "radiologist"), ("web-admin", "admin")):
        if accounts.get_user(name) is None:
            accounts.add_user(name, "a long enough password", role=role, display_name=name)
    rad = accounts.authenticate("web-rad", "a long enough password").token
    admin = accounts.authenticate("web-admin", "a long enough password").token

    def get(token: str | None, path: str = f"/studies?StudyInstanceUID={study_uid}") -> Any:
        cookies = {COOKIE: token} if token else None
        return httpx.get(_url(node) + path, cookies=cookies, timeout=30)

    found = get(rad)
    assert found.status_code == 200, found.text
    assert [s["0020000D"]["Value"][0] for s in found.json()] == [study_uid]
    files = sorted(small_study.glob("*.dcm"))
    sop = pydicom.dcmread(files[0], stop_before_pixels=True)
    instance = get(
        rad, f"/studies/{study_uid}/series/{sop.SeriesInstanceUID}/instances/{sop.SOPInstanceUID}"
    )
    assert instance.status_code == 200 and instance.content.count(b"DICM") >= 1

    stored = httpx.post(
        _url(node) + "/studies",
        content=_multipart([files[0].read_bytes()]),
        headers={"Content-Type": STOW_TYPE},
        cookies={COOKIE: rad},
        timeout=30,
    )
    assert stored.status_code == 403
    assert "people search and retrieve; systems store" in stored.text

    refused = get(admin)
    assert refused.status_code == 403 and "needs the role radiologist or engineer" in refused.text
    anonymous = get(None)
    assert anonymous.status_code == 401 and "sign in to the review app" in anonymous.text
    assert accounts.revoke(rad)  # signed out in the review app
    ended = get(rad)
    assert ended.status_code == 401 and "session has ended" in ended.text
