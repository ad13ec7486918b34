"""The storage SCP (PS3.4 Annex B, as SCP) against crafted bad data sets and a full disk.

Malformed data sets get a failure status and one log line (UIDs, never patient data), nothing
of them is kept, and the node keeps serving; an empty element of an unknown VR is stored as
received; and the disk floor refuses cleanly with Out of Resources.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from aidx.store.store import instances
from dicom_node import status
from tests.dicom_node.conftest import NodeFactory
from tests.dicom_node.senders import (
    Instance,
    assert_spool_clean,
    dataset_bytes,
    echo_ok,
    encode,
    send_raw,
)

SECRET_NAME = "SECRET^PATIENT"
SECRET_ID = "SECRET123"


# --------------------------------------------------------------------------------- helpers
def send_one(port: int, item: Instance, work: Path) -> int | None:
    (code,) = send_raw(port, [item], work)
    return code


def assert_no_patient_data_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = f"{record.getMessage()} {vars(record)}"
        assert "SECRET" not in text, f"patient data in a log record: {text}"
    assert "SECRET" not in caplog.text


def crafted_image() -> Dataset:
    """A small, valid CT image of a patient whose name and ID must never be logged."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2
    return ds


# ------------------------------------------------------------------------- 1. bad input
@dataclass(frozen=True)
class BadInput:
    """A malformed C-STORE: build(ds) gives the data set bytes and the request's SOP UID."""

    build: Callable[[Dataset], tuple[bytes, str]]
    status: int
    reason: str
    transfer_syntax: str = ExplicitVRLittleEndian


def _other_sop_uid(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds), generate_uid()


def _no_study_uid(ds: Dataset) -> tuple[bytes, str]:
    del ds.StudyInstanceUID
    return encode(ds), str(ds.SOPInstanceUID)


def _invalid_study_uid(ds: Dataset) -> tuple[bytes, str]:
    ds["StudyInstanceUID"] = DataElement(
        0x0020000D, "UI", "1.2.abc", validation_mode=pydicom.config.IGNORE
    )
    return encode(ds), str(ds.SOPInstanceUID)


def _truncated_pixel_data(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds)[:-100], str(ds.SOPInstanceUID)


def _no_pixel_data(ds: Dataset) -> tuple[bytes, str]:
    del ds.PixelData
    return encode(ds), str(ds.SOPInstanceUID)


def _header_cut_short(ds: Dataset) -> tuple[bytes, str]:
    # A last element (7FE1,0010) OB whose 4-byte length field has only 1 byte.
    return encode(ds) + b"\xe1\x7f\x10\x00OB\x00\x00\x01", str(ds.SOPInstanceUID)


def _not_deflated(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds), str(ds.SOPInstanceUID)  # sent as Deflated Explicit VR Little Endian


BAD_INPUTS = {
    "sop-uid-differs-from-request": BadInput(
        _other_sop_uid, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "differs from the request"
    ),
    "no-study-uid": BadInput(
        _no_study_uid, status.CANNOT_UNDERSTAND, "StudyInstanceUID is missing"
    ),
    "invalid-study-uid": BadInput(
        _invalid_study_uid, status.CANNOT_UNDERSTAND, "'1.2.abc' is not a valid UID"
    ),
    "truncated-pixel-data": BadInput(
        _truncated_pixel_data, status.CANNOT_UNDERSTAND, "truncated: element (7FE0,0010)"
    ),
    "image-without-pixel-data": BadInput(
        _no_pixel_data, status.CANNOT_UNDERSTAND, "an image without pixel data"
    ),
    "element-header-cut-short": BadInput(
        _header_cut_short, status.CANNOT_UNDERSTAND, "cannot parse the data set"
    ),
    "deflated-data-set-that-is-not": BadInput(
        _not_deflated,
        status.CANNOT_UNDERSTAND,
        "cannot parse the data set",
        DeflatedExplicitVRLittleEndian,
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_data_set_is_refused_with_one_log_line(
    case: BadInput,
    start_node: NodeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's too: none may leak patient data
    node = start_node()
    data, request_uid = case.build(crafted_image())

    got = send_one(
        node.port, Instance(data, CTImageStorage, request_uid, case.transfer_syntax), tmp_path
    )

    assert got == case.status, f"status 0x{got or 0:04X}, expected 0x{case.status:04X}"
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aidx") and request_uid in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert case.reason in lines[0], lines[0]
    assert f"status=0x{case.status:04X}" in lines[0], lines[0]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # Nothing of the refused instance is kept.
    assert node.store.count(instances) == 0
    assert list(node.spool.files()) == []
    assert_spool_clean(node)
    # The node keeps serving: an echo and a valid instance on new associations.
    assert echo_ok(node.port)
    good = crafted_image()
    good_uid = str(good.SOPInstanceUID)
    assert send_one(node.port, Instance(encode(good), CTImageStorage, good_uid), tmp_path) == 0
    assert [row["sop_uid"] for row in node.store.study_instances(good.StudyInstanceUID)] == [
        good_uid
    ]
    assert_no_patient_data_logged(caplog)


def test_empty_element_with_unknown_vr_is_stored_as_received(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """An empty element with a VR pydicom does not know is kept, not a processing failure (the
    node used to convert empty values while checking completeness, and that raised)."""
    node = start_node()
    ds = crafted_image()
    data = encode(ds) + b"\xe1\x7f\x10\x00ZZ\x00\x00"  # (7FE1,0010), VR "ZZ", no value
    sop_uid = str(ds.SOPInstanceUID)
    assert send_one(node.port, Instance(data, CTImageStorage, sop_uid), tmp_path) == 0
    (row,) = node.store.study_instances(ds.StudyInstanceUID)
    assert dataset_bytes(Path(row["path"])) == data


# ----------------------------------------------------------------------- 3. disk floor
def test_disk_floor_refuses_with_out_of_resources(
    start_node: NodeFactory,
    small_study: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    node = start_node(node__min_free_disk_mb=free_mb + 1024)
    study = []
    for path in sorted(small_study.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        study.append(
            Instance(
                dataset_bytes(path),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        )

    assert send_raw(node.port, study, tmp_path) == [status.OUT_OF_RESOURCES] * len(study)

    for item in study:
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("aidx") and item.sop_uid in r.getMessage()
        ]
        assert len(lines) == 1, lines
        assert "status=0xA700" in lines[0] and "free disk space below" in lines[0], lines[0]
    assert list(node.spool.files()) == []
    assert_spool_clean(node)
    assert node.store.count(instances) == 0
    # Still serving: an echo now, and stores again once there is room.
    assert echo_ok(node.port)
    node.spool.min_free_bytes = 0
    assert send_raw(node.port, study, tmp_path) == [status.SUCCESS] * len(study)
    assert node.store.count(instances) == len(study)
