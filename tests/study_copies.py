"""Studies made from one study: the same images under new Study, Series, Frame of Reference
and SOP Instance UIDs (as if the same patient were scanned again). For tests and benchmarks that
need many studies and not many phantoms (a queue, an ingest rate): a copy takes milliseconds, a
phantom seconds of CPU."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def copy_with_new_uids(source: Path, target: Path, seed: str | None = None) -> Path:
    """Copy the DICOM files in ``source`` into the new folder ``target`` under new UIDs, so that
    a receiver sees a different study, not a re-send. ``seed``: the same seed gives the same
    UIDs (else they are new each time)."""
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == ".dcm")
    if not files:
        raise ValueError(f"no .dcm files in {source}")
    target.mkdir(parents=True, exist_ok=False)
    renamed: dict[str, str] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in (*_UID_KEYWORDS, "SOPInstanceUID"):
            if keyword in ds:
                old = str(ds.data_element(keyword).value)
                if old not in renamed:
                    renamed[old] = str(generate_uid(entropy_srcs=[seed, old] if seed else None))
                setattr(ds, keyword, renamed[old])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def study_copies(source: Path, out: Path, count: int, tag: str = "copy") -> list[Path]:
    """``count`` copies of the study in ``source`` (:func:`copy_with_new_uids`) in folders
    ``study-<n>`` under ``out``, each with its own UIDs, the same for the same ``tag``."""
    return [copy_with_new_uids(source, out / f"study-{n}", seed=f"{tag}-{n}") for n in range(count)]
