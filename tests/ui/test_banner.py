"""The viewer names the patient as PACS viewers do: PN rendered without ``^`` (every
component group, a GB18030 name included), ID, birth date and sex, accession, study date and
description, in the user's language."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ui.i18n import text
from ui.identification import PatientIdentification
from ui.viewer_session import ViewerState, dicom_date, patient_banner, person_name


@pytest.mark.parametrize(
    ("pn", "shown"),
    [
        ("DOE^JANE", "DOE, JANE"),
        ("DOE^JANE^M^DR^JR", "DR DOE, JANE M JR"),
        ("PHANTOM", "PHANTOM"),
        ("^JANE", "JANE"),
        ("Wang^XiaoDong=王^小东=", "Wang, XiaoDong (王, 小东)"),
        ("=王^小明", "王, 小明"),
        ("", ""),
    ],
)
def test_a_person_name_is_shown_without_its_separators(pn: str, shown: str) -> None:
    assert person_name(pn) == shown


def test_dates_read_as_dates() -> None:
    assert dicom_date("19610203") == "1961-02-03"
    assert dicom_date("1961-02-03") == "1961-02-03"  # non-standard: shown as received


class Reviews:
    def __init__(self, who: PatientIdentification) -> None:
        self.who = who

    def identification(self, review_id: int) -> PatientIdentification:
        assert review_id == 7
        return self.who


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_banner_names_the_patient_and_the_study(lang: str) -> None:
    who = PatientIdentification(
        "=王^小明", "PID_7*", "19600101", "M", "ACC-001", "20261128", "CT CHEST"
    )
    st = ViewerState()
    st.review_id = 7
    banner = patient_banner(
        SimpleNamespace(reviews=Reviews(who)), st, lambda k, **v: text(lang, k, **v)
    )
    assert banner.startswith("**王, 小明**")
    assert "PID\\_7\\*" in banner  # Markdown characters escaped
    assert "1960-01-01" in banner and "ACC-001" in banner and "2026-11-28" in banner
    assert "CT CHEST" in banner
    assert ("出生" in banner) == (lang == "zh")


def test_no_study_no_banner(tmp_path: Path) -> None:
    assert patient_banner(SimpleNamespace(), ViewerState(), lambda k, **v: k) == ""
