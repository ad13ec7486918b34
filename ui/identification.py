"""Who a review is about: the patient and study as the PACS holds them, for the viewer's
banner (``ui.viewer_session.patient_banner``). For the radiologist's screen only: never logged."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from aidx.store.schema import patients, reviews, studies
from aidx.store.store import Store


@dataclass(frozen=True)
class PatientIdentification:
    """DICOM values as received: a PN with ``^`` between its components, dates as YYYYMMDD."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    description: str


def patient_identification(store: Store, review_id: int) -> PatientIdentification | None:
    """The patient and study of review ``review_id`` (None: no such review)."""
    with store.engine.connect() as conn:
        r = conn.execute(
            select(
                patients.c.patient_name,
                patients.c.patient_id,
                patients.c.birth_date,
                patients.c.sex,
                studies.c.accession_number,
                studies.c.study_date,
                studies.c.description,
            )
            .select_from(reviews)
            .join(studies, studies.c.study_uid == reviews.c.study_uid)
            .join(patients, patients.c.id == studies.c.patient_pk)
            .where(reviews.c.id == review_id)
        ).first()
    return None if r is None else PatientIdentification(*(str(v or "") for v in r))
