"""Patient data stays out of the logs, and attributes that do not parse do not stop a study.

A study whose patient has a one-component name (valid DICOM: a family name alone, which
highdicom warns about, quoting it) and whose birth date, age and study time do not parse
(``1961-02-03``, ``abc``, ``25:99``: pydicom warns quoting each, highdicom raised on the date) is
run through the real worker and the real result writers, and through ``aidx infer`` as a user
runs it. The study gets its SR and SEG, they carry the name and leave the bad values empty, and
neither the logs, nor the warnings, nor the job's reason and events, nor ``aidx status`` quote
the name or the values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.valuerep import DA, validate_value

import inference.results_common
from aidx.config import AidxConfig, load_config
from aidx.logs import (
    REDACTED,
    exception_text,
    patient_values,
    patient_values_of,
    protect_patient_data,
)
from aidx.pipeline.worker import Worker
from aidx.store.store import Store
from dicom_node.parse import read_file
from tests.inference.results_case import dciodvfy_errors
from tests.standin_model import install
from training.phantom import NoduleRequest, PhantomOptions, generate

NAME = "MUSTERMANNPRIV"  # one component: highdicom's "unlikely to represent a person name"
BAD = {"PatientBirthDate": "1961-02-03", "PatientAge": "abc", "StudyTime": "25:99"}
SECRETS = (NAME, *BAD.values())


@dataclass(frozen=True)
class BadStudy:
    files: list[Path]
    study_uid: str
    root: Path


@pytest.fixture(scope="module")
def bad_study(tmp_path_factory: pytest.TempPathFactory) -> BadStudy:
    """A phantom CT (one nodule the stand-in model finds) with the name and values above."""
    root = tmp_path_factory.mktemp("phi")
    phantom = generate(
        root / "study",
        PhantomOptions(
            seed=7,
            slices=30,
            matrix=96,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    files = sorted(Path(phantom.dicom_dir).glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values we write on purpose
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientName = NAME
            for keyword, value in BAD.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    install(root / "models", root)
    return BadStudy(files, study_uid, root)


def _config(study: BadStudy, data_dir: Path) -> AidxConfig:
    return load_config(
        env={},
        overrides={
            "data_dir": str(data_dir),
            "models.dir": str(study.root / "models"),
            "models.default": "soft-tissue",
            "inference.min_volume_mm3": 50,
            "inference.providers": ["CPUExecutionProvider"],
        },
    )


def _queue(store: Store, study: BadStudy) -> int:
    for path in study.files:
        record = replace(read_file(path.read_bytes(), "PACS"), path=str(path))
        store.index_instance(record, 1000.0, 1.0)
    job_id = store.complete_study(study.study_uid, time.time())
    assert job_id is not None
    return job_id


class Capture:
    """Every log record (the libraries' included) and every warning raised while it is
    active, with patient data protected as every aidx command protects it."""

    def __init__(self, caplog: pytest.LogCaptureFixture, caught: list[warnings.WarningMessage]):
        self.caplog = caplog
        self.caught = caught
        self.extra: list[str] = []

    def texts(self) -> list[str]:
        records = self.caplog.records
        return [
            *(str(w.message) for w in self.caught),
            *(r.getMessage() for r in records),
            *(r.exc_text or "" for r in records),
            self.caplog.text,
            *self.extra,
        ]

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records]


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[Capture]:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # nothing hidden as "already shown" ...
        protect_patient_data()  # ... only what aidx hides (its filters go in front)
        yield Capture(caplog, caught)


def assert_no_patient_data(texts: list[str], where: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{where} quotes {secret!r}: {text[:400]}"


def test_a_study_with_a_one_component_name_and_bad_dates_gets_results_and_no_log_quotes_them(
    bad_study: BadStudy, tmp_path: Path, captured: Capture
) -> None:
    config = _config(bad_study, tmp_path / "data")
    config.data_dir.mkdir()
    store = Store.for_config(config)
    job_id = _queue(store, bad_study)
    assert Worker(config, store).run_once()

    job = store.job(job_id)
    assert job is not None and job["state"] == "results_ready", job
    (result,) = store.study_results(bad_study.study_uid)
    assert result["seg_path"] is not None and result["finding_count"] >= 1
    for path in (result["sr_path"], result["seg_path"]):
        written = pydicom.dcmread(path)
        assert str(written.PatientName) == NAME  # names are copied as received
        for keyword in BAD:
            assert keyword in written and written[keyword].value in ("", None), keyword
    sr = hd.sr.srread(result["sr_path"])
    assert sr.StudyInstanceUID == bad_study.study_uid
    seg = hd.seg.segread(result["seg_path"])
    assert seg.PatientName == NAME

    assert_no_patient_data(captured.texts(), "the log or a warning")
    events = store.study_events(bad_study.study_uid)
    assert_no_patient_data([json.dumps(events, default=str)], "the study's events")
    # The operator learns what was left empty, and where (UIDs), never the value.
    left_empty = [m for m in captured.messages() if "carry it empty" in m]
    for keyword in BAD:
        line = next((m for m in left_empty if m.startswith(keyword)), None)
        assert line is not None, (keyword, left_empty)
        assert bad_study.study_uid in line


def test_results_with_values_left_empty_pass_dciodvfy(
    bad_study: BadStudy, tmp_path: Path, captured: Capture
) -> None:
    config = _config(bad_study, tmp_path / "data")
    config.data_dir.mkdir()
    store = Store.for_config(config)
    _queue(store, bad_study)
    assert Worker(config, store).run_once()
    (result,) = store.study_results(bad_study.study_uid)
    for path in (result["sr_path"], result["seg_path"]):
        assert dciodvfy_errors(Path(path)) == [], path
    assert_no_patient_data(captured.texts(), "the log or a warning")


def test_a_library_error_that_quotes_a_value_fails_the_job_without_the_value(
    bad_study: BadStudy,
    tmp_path: Path,
    captured: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the writers' check (turned off here), highdicom raises "Unable to convert
    '1961-02-03' to 'DA' object": the job fails, and its reason, its events, the log and
    ``aidx status`` say so without the date."""
    monkeypatch.setattr(inference.results_common, "copyable_sources", list)
    config = _config(bad_study, tmp_path / "data")
    config.data_dir.mkdir()
    store = Store.for_config(config)
    job_id = _queue(store, bad_study)
    assert Worker(config, store).run_once()
    job = store.job(job_id)
    assert job is not None and job["state"] == "failed", job
    assert job["reason"] == f"ValueError: Unable to convert '{REDACTED}' to 'DA' object"
    events = store.study_events(bad_study.study_uid)
    assert any(e["event"] == "failed" and e["detail"] == job["reason"] for e in events), events
    store.close()
    status = subprocess.run(
        [sys.executable, "-m", "aidx", "--data-dir", str(config.data_dir), "status"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AIDX_")},
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert REDACTED in status.stdout  # the listing shows the failed job's reason
    captured.extra += [json.dumps(events, default=str), str(job), status.stdout, status.stderr]
    assert_no_patient_data(captured.texts(), "the failure")


def test_aidx_infer_on_the_study_writes_results_and_prints_no_patient_data(
    bad_study: BadStudy, tmp_path: Path
) -> None:
    """As a user runs it: aidx's own logging set-up, the libraries' real warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env |= {
        "AIDX_MODELS__DIR": str(bad_study.root / "models"),
        "AIDX_MODELS__DEFAULT": "soft-tissue",
        "AIDX_INFERENCE__MIN_VOLUME_MM3": "50",
        "AIDX_LOG__LEVEL": "DEBUG",
    }
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aidx",
            "--data-dir",
            str(tmp_path / "data"),
            "infer",
            str(bad_study.files[0].parent),
            "--out",
            str(out),
            "--key-images",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "sr.dcm").is_file() and (out / "seg.dcm").is_file()
    key_images = sorted((out / "key_images").glob("*.dcm"))
    assert key_images and str(pydicom.dcmread(key_images[0]).PatientName) == NAME
    for keyword in BAD:  # the user is told what was left empty ...
        assert f"{keyword} of the source images is not a valid" in run.stderr
    assert_no_patient_data([run.stdout, run.stderr], "aidx infer")  # ... never the values


# Values pydicom cannot write, patched into the files' bytes (Explicit VR Little Endian):
# (group, element, VR, value written, value patched in), lengths equal.
ODD = (
    (0x0010, 0x0040, "CS", b"M ", b"X "),  # PatientSex: highdicom accepts M, F, O only
    (0x0010, 0x1030, "DS", b"71.3", b"abc "),  # PatientWeight
    (0x0010, 0x1020, "DS", b"1.75", b"1,75"),  # PatientSize, a European decimal comma
    (0x0008, 0x0020, "DA", b"20261202", b"20261340"),  # StudyDate: no 13th month
    (0x0010, 0x0032, "TM", b"120000", b"256000"),  # PatientBirthTime
)


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr.encode() + struct.pack("<H", len(value)) + value


@pytest.fixture(scope="module")
def odd_study(tmp_path_factory: pytest.TempPathFactory, bad_study: BadStudy) -> BadStudy:
    """The study above, copied, with more values that do not parse (see ODD)."""
    root = tmp_path_factory.mktemp("odd")
    files = []
    for source in bad_study.files:
        ds = pydicom.dcmread(source)
        ds.PatientSex, ds.PatientWeight, ds.PatientSize = "M", "71.3", "1.75"
        ds.StudyDate, ds.PatientBirthTime = "20261202", "120000"
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["odd", ds.SOPInstanceUID])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["odd", ds.SeriesInstanceUID])
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["odd", ds.StudyInstanceUID])
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        for group, element, vr, written, patched in ODD:
            before = _element(group, element, vr, written)
            assert data.count(before) == 1, (hex(group), hex(element))
            data = data.replace(before, _element(group, element, vr, patched))
        path = root / source.name
        path.write_bytes(data)
        files.append(path)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return BadStudy(files, study_uid, bad_study.root)


def test_other_values_that_do_not_parse_are_left_empty_too(
    odd_study: BadStudy, tmp_path: Path, captured: Capture
) -> None:
    """A sex other than M, F or O, a weight and a size that are no numbers, a date and a time
    that do not exist: the study gets its SR and SEG (they would have failed or been written
    invalid), with those values empty."""
    config = _config(odd_study, tmp_path / "data")
    config.data_dir.mkdir()
    store = Store.for_config(config)
    job_id = _queue(store, odd_study)
    assert Worker(config, store).run_once()
    job = store.job(job_id)
    assert job is not None and job["state"] == "results_ready", job
    (result,) = store.study_results(odd_study.study_uid)
    keywords = [pydicom.datadict.keyword_for_tag((g << 16) | e) for g, e, *_ in ODD]
    for path in (result["sr_path"], result["seg_path"]):
        written = pydicom.dcmread(path)
        for keyword in (*keywords, *BAD):
            assert written.get(keyword) is None or written[keyword].value in ("", None), (
                path,
                keyword,
            )
    said = " ".join(captured.messages())
    for keyword in keywords:
        assert f"{keyword} of the source images is not a valid" in said, keyword
    assert_no_patient_data(captured.texts(), "the log or a warning")


@pytest.mark.parametrize(
    ("vr", "value"),
    [("DA", "1961-02-03"), ("TM", "25:99"), ("AS", "abc"), ("DS", NAME)],
)
def test_pydicoms_invalid_value_warnings_reach_the_log_without_the_value(
    vr: str, value: str, captured: Capture
) -> None:
    validate_value(vr, value, pydicom_config.WARN)  # what pydicom does reading such a value
    said = f"Invalid value for VR {vr}: '{REDACTED}'."
    assert any(m.startswith(said) for m in captured.messages()), captured.messages()
    assert_no_patient_data(captured.texts(), f"pydicom's {vr} warning")


def test_a_library_exception_is_told_without_the_value_it_quotes(captured: Capture) -> None:
    birth_date = BAD["PatientBirthDate"]  # a name: tracebacks show the source line
    with pytest.raises(ValueError) as raised:
        DA(birth_date)
    text = exception_text(raised.value)
    assert text == f"ValueError: Unable to convert '{REDACTED}' to 'DA' object"
    log = logging.getLogger("aidx.test")
    try:
        raise raised.value
    except ValueError:
        log.exception("while writing a result")  # the traceback's messages redacted
    log.warning("cannot write: %s", raised.value)  # an exception as an argument
    hd.valuerep.check_person_name(NAME)  # highdicom's warning quoting the name
    warnings.warn(f'the name "{NAME}" is odd', UserWarning, stacklevel=1)  # any other warning
    assert "while writing a result" in captured.messages()
    assert_no_patient_data([*captured.texts(), text], "a library's error")


def test_the_current_patients_values_are_redacted_from_any_record(
    bad_study: BadStudy, captured: Capture
) -> None:
    """While a study is worked on, a record that quotes its patient's values (here a path
    named after the patient, as some PACS exports name folders) shows none of them; a UID
    that happens to contain the same digits stays whole."""
    ds = pydicom.dcmread(bad_study.files[0], stop_before_pixels=True)
    ds.PatientID = "47110815"
    log = logging.getLogger("aidx.test")
    with patient_values(patient_values_of(ds)):
        log.info(
            "cannot read /import/%s_%s/1.dcm (patient 47110815, uid 1.2.47110815.1)",
            NAME,
            BAD["PatientBirthDate"],
        )
    message = captured.messages()[-1]
    assert message == (
        f"cannot read /import/{REDACTED}_{REDACTED}/1.dcm (patient {REDACTED}, uid 1.2.47110815.1)"
    )
    log.info("after the study: %s", NAME)  # nothing known to redact any more
    assert captured.messages()[-1] == f"after the study: {NAME}"


def test_quoted_values_are_redacted_before_pydicom_is_imported() -> None:
    """aidx.logs leaves pydicom unimported (not every aidx process reads DICOM) and reads the
    DICOM keywords and VRs from it when a record first needs them: a warning that comes first
    is redacted the same."""
    code = (
        "import sys, warnings\n"
        "from aidx.logs import redact_quoted\n"
        "assert 'pydicom' not in sys.modules\n"
        f"print(redact_quoted(\"'PatientName' of VR 'PN' is '{NAME}'\"))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"'PatientName' of VR 'PN' is '{REDACTED}'"
