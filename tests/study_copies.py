"""Distinct studies from one generated phantom: the same images under new Study, Series,
Frame of Reference and SOP Instance UIDs (as if the same patient were scanned again). For tests
that need many studies and not many phantoms (a queue test): a copy takes milliseconds, a
phantom seconds of CPU."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def study_copies(source: Path, out: Path, count: int, tag: str = "copy") -> list[Path]:
    """``count`` folders under ``out``, each a copy of the DICOM files in ``source`` with its
    own UIDs (derived from ``tag`` and the copy's number: the same call gives the same UIDs).
    Copy 0 keeps nothing of the source's UIDs either."""
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == ".dcm")
    if not files:
        raise ValueError(f"no .dcm files in {source}")
    folders = []
    for n in range(count):
        folder = out / f"study-{n}"
        folder.mkdir(parents=True, exist_ok=False)
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword in _UID_KEYWORDS:
                if keyword in ds:
                    setattr(ds, keyword, _new_uid(str(ds.data_element(keyword).value), tag, n))
            ds.SOPInstanceUID = _new_uid(str(ds.SOPInstanceUID), tag, n)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / path.name, enforce_file_format=True)
        folders.append(folder)
    return folders


def _new_uid(uid: str, tag: str, n: int) -> str:
    """The UID that stands for ``uid`` in copy ``n`` (the same for every file of the copy)."""
    return str(generate_uid(entropy_srcs=[tag, str(n), uid]))
