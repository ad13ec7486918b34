"""The key slices as a Key Object Selection document: valid (dciodvfy), read back by highdicom
and pydicom as a PACS reads it (title "Of Interest", the key slices of the findings, each once,
in the source study), the same UIDs when written again, nothing without findings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from inference.kos import KOS_SERIES_NUMBER, OF_INTEREST, build_kos, write_kos
from tests.inference.results_case import MODEL, Case, dciodvfy_errors
from tests.inference.test_results import case  # noqa: F401 - the fixture

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


def test_the_key_slices_are_of_interest(case: Case, tmp_path: Path) -> None:  # noqa: F811
    path = write_kos(case.findings, case.datasets, MODEL, tmp_path / "kos.dcm")
    assert path is not None
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert (ds.SOPClassUID, ds.Modality, ds.SeriesNumber) == (KOS_STORAGE, "KO", KOS_SERIES_NUMBER)
    assert ds.StudyInstanceUID == case.volume.study_uid
    assert ds.PatientName == case.datasets[0].PatientName  # the source patient, unchanged
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    (title,) = ds.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator) == (
        OF_INTEREST.value,
        OF_INTEREST.scheme_designator,
    )
    keys = [f.key_sop_instance_uid for f in case.findings]
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ds.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    volume_order = [uid for uid in case.volume.sop_uids if uid in keys]
    assert referenced == volume_order  # each key slice once, in volume order
    description = next(item.TextValue for item in ds.ContentSequence if item.ValueType == "TEXT")
    assert "Nodule 1" in description and "not for clinical use" in description
    evidence = [
        sop.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(volume_order)
    assert kos.SOPInstanceUID == ds.SOPInstanceUID
    again = build_kos(case.findings, case.datasets, MODEL)
    assert again is not None and again.SOPInstanceUID == ds.SOPInstanceUID  # a rerun: same UIDs


def test_no_findings_no_kos(case: Case, tmp_path: Path) -> None:  # noqa: F811
    assert build_kos([], case.datasets, MODEL) is None
    assert write_kos([], case.datasets, MODEL, tmp_path / "kos.dcm") is None
    assert not (tmp_path / "kos.dcm").exists()


def test_a_key_slice_outside_the_series_is_refused(case: Case) -> None:  # noqa: F811
    stray = replace(case.findings[0], key_sop_instance_uid="1.2.3.4")
    with pytest.raises(ValueError, match=r"key slice 1\.2\.3\.4 is not an image"):
        build_kos([stray], case.datasets, MODEL)
