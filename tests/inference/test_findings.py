"""The canonical Finding record and the findings.json contract."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from inference.findings import FORMAT, Finding, FindingsError, FindingsReport

FINDING = Finding(
    id=1,
    probability=0.87,
    center_mm=(-60.5, 12.25, -140.0),
    diameter_mm=8.4,
    volume_mm3=310.2,
    bbox_mm=((-65.0, 8.0, -144.0), (-56.0, 16.5, -136.0)),
    key_sop_instance_uid="1.2.3.4.5",
)


def test_report_round_trips_through_findings_json(tmp_path: Path) -> None:
    report = FindingsReport("1.2.3", "1.2.3.4", "lung-nodule", "0.1.0", (FINDING,))
    path = tmp_path / "findings.json"
    report.write(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == FORMAT
    assert data["model"] == {"name": "lung-nodule", "version": "0.1.0"}
    assert set(data["findings"][0]) == {
        "id",
        "probability",
        "center_mm",
        "diameter_mm",
        "volume_mm3",
        "bbox_mm",
        "key_sop_instance_uid",
    }
    assert FindingsReport.read(path) == report


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": 0}, "id must be 1 or more"),
        ({"probability": 1.5}, "probability 1.5 not in 0..1"),
        ({"probability": float("nan")}, "not in 0..1"),
        ({"diameter_mm": 0.0}, "diameter_mm must be > 0"),
        ({"center_mm": (0.0, float("inf"), 0.0)}, "3 finite numbers"),
        ({"bbox_mm": ((0.0, 0.0, 1.0), (1.0, 1.0, 0.0))}, "lower corner above upper"),
        ({"key_sop_instance_uid": ""}, "key_sop_instance_uid is empty"),
    ],
)
def test_invalid_findings_cannot_be_built(change: dict[str, object], message: str) -> None:
    with pytest.raises(FindingsError, match=message):
        replace(FINDING, **change)  # type: ignore[arg-type]


def test_a_broken_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "findings.json"
    path.write_text('{"study_instance_uid": "1"}', encoding="utf-8")
    with pytest.raises(FindingsError, match="not a findings file"):
        FindingsReport.read(path)
    report = FindingsReport("1", "2", "m", "1", (FINDING, FINDING))
    report.write(path)
    with pytest.raises(FindingsError, match="ids repeat"):
        FindingsReport.read(path)
