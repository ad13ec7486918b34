"""What the DICOMweb service can find and return: the instances the node stored (the index)
and aidx's own results for the same studies (the AI SR, SEG, KOS and key images of each job,
and the radiologists' signed SRs), as one list per study.

aidx's results are not in the index (indexing them would reopen the study and run it again):
they are found through the ``results`` and ``reviews`` tables, and their headers are read from
the files (cached by path, size and modification time).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from aidx.store.schema import instances, patients, results, reviews, series, studies
from aidx.store.store import Store

log = logging.getLogger("aidx.dicomweb")

# Header attributes of a result object that place it in its study.
_RESULT_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
]


@dataclass(frozen=True)
class Entry:
    """One instance the service can return: stored, or one of aidx's results."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    instance_number: int | None
    path: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str = ""
    result: bool = False  # written by aidx (AI result or signed report)


@dataclass(frozen=True)
class SeriesSummary:
    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None
    description: str
    body_part: str
    instance_count: int


class Catalog:
    """Queries over the index and the result files (thread-safe)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._headers: dict[str, tuple[tuple[int, int], Entry | None]] = {}
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------------- studies
    def studies(self, study_uids: list[str] | None = None) -> list[dict[str, Any]]:
        """Study rows with their patient (index columns), oldest first; ``study_uids``
        restricts them."""
        query = (
            select(
                studies.c.study_uid,
                studies.c.study_date,
                studies.c.study_time,
                studies.c.accession_number,
                studies.c.description,
                studies.c.instance_count,
                patients.c.patient_id,
                patients.c.issuer,
                patients.c.patient_name,
                patients.c.birth_date,
                patients.c.sex,
            )
            .join(patients, patients.c.id == studies.c.patient_pk)
            .order_by(studies.c.first_arrival, studies.c.study_uid)
        )
        if study_uids is not None:
            query = query.where(studies.c.study_uid.in_(study_uids))
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def study_exists(self, study_uid: str) -> bool:
        return bool(self.studies([study_uid]))

    # ---------------------------------------------------------------------------------- series
    def series(self, study_uid: str) -> list[SeriesSummary]:
        """The study's series: stored ones (index) and aidx's result series."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(series)
                .where(series.c.study_uid == study_uid)
                .order_by(series.c.series_number, series.c.series_uid)
            ).all()
        out = [
            SeriesSummary(
                study_uid,
                str(r.series_uid),
                str(r.modality or ""),
                r.series_number,
                str(r.description or ""),
                str(r.body_part or ""),
                int(r.instance_count),
            )
            for r in rows
        ]
        grouped: dict[str, list[Entry]] = {}
        for entry in self.results(study_uid):
            grouped.setdefault(entry.series_uid, []).append(entry)
        for series_uid, entries in grouped.items():
            first = entries[0]
            out.append(
                SeriesSummary(
                    study_uid,
                    series_uid,
                    first.modality,
                    first.series_number,
                    first.series_description,
                    "",
                    len(entries),
                )
            )
        return out

    # ------------------------------------------------------------------------------- instances
    def instances(self, study_uid: str, series_uid: str | None = None) -> list[Entry]:
        """The study's (or one series') instances, stored and results, in series and instance
        order."""
        query = (
            select(
                instances.c.sop_uid,
                instances.c.series_uid,
                instances.c.sop_class_uid,
                instances.c.transfer_syntax,
                instances.c.instance_number,
                instances.c.path,
                series.c.modality,
                series.c.series_number,
                series.c.description,
                series.c.body_part,
            )
            .join(series, series.c.series_uid == instances.c.series_uid)
            .where(instances.c.study_uid == study_uid)
            .order_by(series.c.series_number, instances.c.series_uid, instances.c.instance_number)
        )
        if series_uid is not None:
            query = query.where(instances.c.series_uid == series_uid)
        with self.store.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = [
            Entry(
                study_uid,
                str(r.series_uid),
                str(r.sop_uid),
                str(r.sop_class_uid),
                str(r.transfer_syntax),
                r.instance_number,
                str(r.path),
                str(r.modality or ""),
                r.series_number,
                str(r.description or ""),
                str(r.body_part or ""),
            )
            for r in rows
        ]
        out.extend(
            e for e in self.results(study_uid) if series_uid is None or e.series_uid == series_uid
        )
        return out

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Entry | None:
        for entry in self.instances(study_uid, series_uid):
            if entry.sop_uid == sop_uid:
                return entry
        return None

    # --------------------------------------------------------------------------------- results
    def results(self, study_uid: str) -> list[Entry]:
        """aidx's result objects of the study: every job's result folder (SR, SEG, KOS, key
        images) and the signed SRs, each read once."""
        with self.store.engine.connect() as conn:
            sr_paths = conn.execute(
                select(results.c.sr_path).where(results.c.study_uid == study_uid)
            ).scalars()
            folders = {Path(str(p)).parent for p in sr_paths}
            signed = conn.execute(
                select(reviews.c.signed_sr_path).where(
                    reviews.c.study_uid == study_uid, reviews.c.signed_sr_path.is_not(None)
                )
            ).scalars()
            folders |= {Path(str(p)).parent for p in signed}
        files: list[Path] = []
        for folder in sorted(folders):
            files.extend(sorted(folder.glob("*.dcm")))
            files.extend(sorted(folder.glob("key_images/*.dcm")))
        out = []
        seen = set()
        for path in files:
            entry = self._result_entry(path)
            if entry is None or entry.study_uid != study_uid or entry.sop_uid in seen:
                continue
            seen.add(entry.sop_uid)
            out.append(entry)
        return out

    def studies_with_results(self) -> set[str]:
        with self.store.engine.connect() as conn:
            return {str(u) for u in conn.execute(select(results.c.study_uid).distinct()).scalars()}

    def _result_entry(self, path: Path) -> Entry | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._headers.get(str(path))
        if cached is not None and cached[0] == key:
            return cached[1]
        entry: Entry | None
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_RESULT_TAGS)
            entry = Entry(
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                _int(ds.get("InstanceNumber")),
                str(path),
                str(ds.get("Modality", "")),
                _int(ds.get("SeriesNumber")),
                str(ds.get("SeriesDescription", "")),
                result=True,
            )
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            log.warning("result file %s cannot be read for DICOMweb: %s", path, exc)
            entry = None
        with self._lock:
            self._headers[str(path)] = (key, entry)
        return entry


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
