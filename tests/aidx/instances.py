"""An index record of one received CT instance, for the store's tests (the fields a node reads
from a header, with ordinary values)."""

from __future__ import annotations

from typing import Any

from aidx.store.store import InstanceRecord


def instance_record(
    study: str, n: int, series: str | None = None, **changes: Any
) -> InstanceRecord:
    """Instance ``n`` of ``series`` (default: the study's first) of ``study``; ``changes``
    replace any other field."""
    series = series or f"{study}.1"
    fields: dict[str, Any] = {
        "sop_uid": f"{series}.{n}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "series_uid": series,
        "study_uid": study,
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "patient_id": "PID-SECRET",
        "issuer": "",
        "patient_name": "DOE^JANE",
        "birth_date": "19600101",
        "sex": "F",
        "accession_number": "ACC1",
        "study_date": "20240501",
        "study_time": "120000",
        "study_description": "CT CHEST",
        "modality": "CT",
        "series_description": "LUNG 1.0",
        "body_part": "CHEST",
        "series_number": 1,
        "instance_number": n,
        "path": f"/spool/{series}/{n}.dcm",
        "size": 1000,
        "calling_ae": "PACS",
    }
    return InstanceRecord(**{**fields, **changes})
