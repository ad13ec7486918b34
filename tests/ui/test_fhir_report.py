"""The FHIR R4 DiagnosticReport (issue 20): queued by the worker when the AI results are ready
(preliminary), by the sign-off when the radiologist signs (final, the same report), sent by the
outbox with a conditional update to a FHIR server (tests/peers/fhir.py, which validates every
body), retried and failed with the reason when the server is down or refuses; the ``fhir``
section's wrong keys; an invalid resource fails loudly."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from aidx.cli import main
from aidx.config import AidxConfig, ConfigError, load_config
from aidx.config_show import redacted
from aidx.store.schema import outbox
from aidx.store.store import OutboxItem
from dicom_node.export import ExportWorker
from dicom_node.fhir import FhirSendError, put_report
from inference.fhir_report import (
    DECISION_SYSTEM,
    DICOM_UID,
    FhirReportError,
    fhir_settings,
    validate,
)
from tests.dicom_node.conftest import wait_for
from tests.peers.fhir import FhirPeer
from tests.peers.process import free_port
from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from ui.review import ReviewError
from ui.signoff import SignResult, sign

MRN_SYSTEM = "urn:oid:1.2.840.99999.1"
PUBLIC_DICOMWEB = "https://pacs-gw.hospital.example/dicomweb"
SCT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


@dataclass
class Reported:
    study: ReviewedStudy
    peer: FhirPeer
    patient_id: str
    ai_sr_uid: str


@pytest.fixture(scope="module")
def peer() -> Iterator[FhirPeer]:
    with FhirPeer() as server:
        yield server


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory, peer: FhirPeer) -> Reported:
    """A study run by the worker with the FHIR endpoint on (and the DICOMweb service, for the
    WADO-RS link); nothing delivered yet."""

    def configure(config: AidxConfig) -> None:
        config.fhir = {"url": peer.url, "patient_identifier_system": MRN_SYSTEM}  # type: ignore[assignment]
        config.dicomweb = {"port": 8042, "public_url": PUBLIC_DICOMWEB}  # type: ignore[assignment]

    study = reviewed_study(tmp_path_factory.mktemp("fhir"), configure=configure)
    case = study.reviews.case(study.review_id())
    ai = dcmread(case.sr_path, stop_before_pixels=True)
    return Reported(study, peer, str(ai.PatientID), case.sr_sop_uid)


def fhir_items(reported: Reported) -> list[OutboxItem]:
    return [i for i in reported.study.store.outbox_items() if i.item_key.startswith("fhir:")]


def the_report(reported: Reported) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one DiagnosticReport of the study at the peer, and its versions (newest last)."""
    (item, *_) = fhir_items(reported)
    official = item.item_key.split(":")[1]
    (stored,) = reported.peer.find("DiagnosticReport", DICOM_UID, f"urn:oid:{official}")
    return stored.current, stored.versions


def preliminary(reported: Reported) -> dict[str, Any]:
    """The preliminary report as the worker wrote (and validated) it."""
    first = fhir_items(reported)[0]
    report: dict[str, Any] = json.loads(Path(first.files[0]).read_text(encoding="utf-8"))
    assert report["status"] == "preliminary"
    return report


def contained(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [c for c in report["contained"] if c["resourceType"] == kind]


def component(observation: dict[str, Any], code: str) -> Any:
    (found,) = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    return found.get("valueQuantity") or found["valueCodeableConcept"]


def test_results_ready_send_a_valid_preliminary_report(
    reported: Reported, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    (item,) = fhir_items(reported)
    assert (item.destination, item.state) == ("fhir", "pending")
    caplog.set_level(logging.DEBUG)
    ExportWorker(reported.study.config, reported.study.store).deliver_due()
    (item,) = fhir_items(reported)
    assert item.state == "sent", item.last_error
    report, versions = the_report(reported)
    assert len(versions) == 1 and report["status"] == "preliminary"
    assert report["subject"]["identifier"] == {"system": MRN_SYSTEM, "value": reported.patient_id}
    assert report["imagingStudy"][0]["identifier"] == {
        "system": DICOM_UID,
        "value": f"urn:oid:{reported.study.study_uid}",
    }
    assert report["identifier"][1]["value"] == f"urn:oid:{reported.ai_sr_uid}"
    assert report["presentedForm"][0]["url"].startswith(
        f"{PUBLIC_DICOMWEB}/studies/{reported.study.study_uid}/series/"
    )
    assert report["presentedForm"][0]["url"].endswith(f"/instances/{reported.ai_sr_uid}")
    assert "performer" not in report
    (device,) = contained(report, "Device")
    case = reported.study.reviews.case(reported.study.review_id())
    assert device["deviceName"] == [{"name": case.model, "type": "model-name"}]
    findings = contained(report, "Observation")
    assert len(findings) == len(reported.study.reviews.findings(case.review_id)) > 0
    for observation in findings:
        assert observation["status"] == "preliminary"
        assert observation["device"] == {"reference": "#model"}
        assert observation["code"]["coding"][0] == {
            "system": SCT,
            "code": "27925004",
            "display": "Nodule",
        }
        assert observation["bodySite"]["coding"][0]["code"] == "39607008"  # Lung
        long_axis = component(observation, "103339001")
        assert (long_axis["system"], long_axis["code"]) == (UCUM, "mm") and long_axis["value"] > 0
        probability = component(observation, "122157")
        assert probability["code"] == "%" and 0 < probability["value"] <= 100
    assert [r["reference"] for r in report["result"]] == [f"#{o['id']}" for o in findings]
    # No patient identifier in the log.
    assert reported.patient_id not in caplog.text
    assert main(["--data-dir", str(reported.study.config.data_dir), "outbox", "list"]) == 0
    assert any(
        line.split()[1:3] == ["fhir", "sent"] for line in capsys.readouterr().out.splitlines()[1:]
    )


def test_signing_makes_the_same_report_final_then_amended_with_the_radiologist(
    reported: Reported, caplog: pytest.LogCaptureFixture
) -> None:
    study, rad = reported.study, reported.study.radiologist
    rid = study.review_id()
    study.reviews.open(rid, rad)
    first, second, *rest = study.reviews.findings(rid)
    study.reviews.decide(rid, first.key, "accept", rad)
    study.reviews.decide(rid, second.key, "edit", rad, diameter_mm=9.5)
    for f in rest:
        study.reviews.decide(rid, f.key, "reject", rad, reason="vessel")
    caplog.set_level(logging.DEBUG)
    result: SignResult = sign(
        study.reviews,
        study.store,
        rid,
        rad,
        study.config.storage_root() / "signed",
        fhir=fhir_settings(study.config, "final"),
    )
    assert result.fhir_queued
    ExportWorker(study.config, study.store).deliver_due()
    assert [i.state for i in fhir_items(reported)] == ["sent", "sent"]
    report, versions = the_report(reported)  # still one report with this identifier
    assert [v["status"] for v in versions] == ["preliminary", "final"]
    assert [v["meta"]["versionId"] for v in versions] == ["1", "2"]
    puts = [(m, status) for m, path, status in reported.peer.requests if m == "PUT"]
    assert puts == [("PUT", 201), ("PUT", 200)]  # created, then updated in place
    assert report["identifier"][1]["value"] == f"urn:oid:{result.sr_uid}"
    (practitioner,) = contained(report, "Practitioner")
    assert practitioner["name"][0]["family"] == "Smith"
    assert practitioner["name"][0]["given"] == ["Anna"]
    assert report["performer"] == report["resultsInterpreter"] == [{"reference": "#radiologist"}]
    findings = contained(report, "Observation")
    decisions = {o["code"]["text"]: component(o, "DECISION") for o in findings}
    assert {d["coding"][0]["system"] for d in decisions.values()} == {DECISION_SYSTEM}
    assert first.ai is not None and second.ai is not None
    assert decisions[f"Nodule {first.ai.id}"]["coding"][0]["code"] == "ACCEPTED"
    assert decisions[f"Nodule {second.ai.id}"]["coding"][0]["code"] == "EDITED"
    rejected = [o for o in findings if component(o, "DECISION")["coding"][0]["code"] == "REJECTED"]
    assert len(rejected) == len(rest)
    assert {o["status"] for o in rejected} == {"entered-in-error"}
    edited = next(o for o in findings if o["code"]["text"] == f"Nodule {second.ai.id}")
    assert component(edited, "103339001")["value"] == pytest.approx(9.5)
    assert all(o["performer"] == [{"reference": "#radiologist"}] for o in findings)
    assert reported.patient_id not in caplog.text

    # Re-opened and signed again: the same report, amended.
    study.reviews.reopen(rid, rad)
    settings = fhir_settings(study.config, "final")
    amended = sign(study.reviews, study.store, rid, rad, result.sr_path.parents[1], fhir=settings)
    ExportWorker(study.config, study.store).deliver_due()
    report, versions = the_report(reported)
    assert [v["status"] for v in versions] == ["preliminary", "final", "amended"]
    assert report["identifier"][1]["value"] == f"urn:oid:{amended.sr_uid}"
    # A crash between recording the signing and queueing: the next sign call queues it.
    last = fhir_items(reported)[-1]
    with study.store._write() as conn:
        conn.execute(outbox.delete().where(outbox.c.id == last.id))
    with pytest.raises(ReviewError, match="already signed"):
        sign(study.reviews, study.store, rid, rad, result.sr_path.parents[1], fhir=settings)
    assert fhir_items(reported)[-1].item_key == last.item_key


def test_an_older_version_queued_before_a_newer_one_is_not_sent_after_it(
    reported: Reported,
) -> None:
    """The preliminary report still retrying when the final one is queued must not replace it
    at the EMR: the outbox sends the newest version only."""
    store = reported.study.store
    (_, signed) = [Path(i.files[0]) for i in fhir_items(reported)][:2]
    older, _ = store.enqueue("fhir", "fhir:1.2.3.99:older", [str(signed)])
    newer, _ = store.enqueue("fhir", "fhir:1.2.3.99:newer", [str(signed)])
    config = reported.study.config.model_copy(deep=True)
    config.fhir.url = f"http://127.0.0.1:{free_port()}/fhir"
    ExportWorker(config, store).deliver_due()
    by_id = {i.id: i for i in store.outbox_items()}
    assert by_id[older].state == "sent" and by_id[older].attempts == 0
    assert f"superseded by item {newer}" in str(by_id[older].last_error)
    assert (by_id[newer].state, by_id[newer].attempts) == ("pending", 1)
    store.mark_attempt_failed(newer, "test over", None)


@pytest.mark.parametrize("refusing", [False, True], ids=["down", "refusing-token"])
def test_an_endpoint_down_or_refusing_is_retried_then_listed_as_failed(
    reported: Reported, refusing: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    store = reported.study.store
    (path, *_) = [Path(i.files[0]) for i in fhir_items(reported)]
    config = reported.study.config.model_copy(deep=True)
    config.outbox.max_attempts = 2
    config.outbox.initial_backoff_s = 0.01
    worker = ExportWorker(config, store)
    with FhirPeer(token="the-right-token") as guarded:
        config.fhir.url = guarded.url if refusing else f"http://127.0.0.1:{free_port()}/fhir"
        config.fhir.auth.bearer_token = "a-wrong-token"  # type: ignore[assignment]
        item_id, _ = store.enqueue("fhir", f"fhir:1.2.3.{int(refusing)}:x", [str(path)])

        def failed_for_good() -> bool:
            worker.deliver_due()
            return next(i for i in store.outbox_items() if i.id == item_id).state == "failed"

        wait_for(failed_for_good, "two attempts at a FHIR endpoint that fails")
    item = next(i for i in store.outbox_items() if i.id == item_id)
    assert item.attempts == 2
    if refusing:
        assert "answered HTTP 401" in str(item.last_error)
        assert "OperationOutcome: error security: no valid bearer token given" in str(
            item.last_error
        )
        assert "check fhir.auth" in str(item.last_error)
    else:
        assert f"PUT to {config.fhir.url} failed" in str(item.last_error)
    data_dir = str(reported.study.config.data_dir)
    assert main(["--data-dir", data_dir, "outbox", "list", "--state", "failed"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == str(item_id)]
    assert line.split()[1:3] == ["fhir", "failed"] and str(item.last_error) in line


def test_a_wrong_fhir_setting_names_the_key_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = {"AIDX_FHIR__URL": "https://emr.example/fhir", "AIDX_FHIR__AUTH__BEARER_TOKEN": "s3"}
    right = load_config(env=secret)
    assert right.fhir.auth.bearer_token is not None
    assert right.fhir.auth.bearer_token.get_secret_value() == "s3"
    assert "s3" not in json.dumps(redacted(right))  # `aidx config show`
    with pytest.raises(ConfigError) as wrong_key:
        load_config(env={}, overrides={"fhir.urll": "https://emr.example/fhir"})
    assert "fhir.urll: unknown key" in str(wrong_key.value)
    assert "did you mean 'url'?" in str(wrong_key.value)
    with pytest.raises(ConfigError) as plain_http:
        load_config(env={"AIDX_FHIR__URL": "http://emr.hospital.example/fhir"})
    assert "fhir.url: 'http://emr.hospital.example/fhir' is plain HTTP" in str(plain_http.value)
    assert "(from AIDX_FHIR__URL)" in str(plain_http.value)
    with pytest.raises(ConfigError) as kind:
        load_config(env={}, overrides={"fhir.send": ["final", "draft"]})
    assert "fhir.send.1: got 'draft'" in str(kind.value)
    config = tmp_path / "aidx.yaml"
    config.write_text("fhir:\n  url: https://emr.example/fhir\n  token: abc\n", encoding="utf-8")
    assert main(["--config", str(config), "outbox", "list"]) != 0
    err = capsys.readouterr().err
    assert "fhir.token: unknown key" in err and "Traceback" not in err


def test_an_invalid_resource_fails_loudly(reported: Reported) -> None:
    """What build_report checks before a report is written and queued (a bug otherwise)."""
    report = preliminary(reported)
    with pytest.raises(FhirReportError, match=r"(?s)invalid FHIR DiagnosticReport.*issued"):
        validate({**report, "issued": "yesterday"})
    with pytest.raises(FhirReportError, match=r"(?s)invalid FHIR DiagnosticReport.*sizeMm"):
        validate({**report, "contained": [{**report["contained"][-1], "sizeMm": 3}]})
    with pytest.raises(FhirReportError, match="status 'draft', not in R4's value set"):
        validate({**report, "status": "draft"})


def test_the_peer_refuses_an_invalid_report_with_an_operation_outcome(
    reported: Reported, tmp_path: Path
) -> None:
    """The test peer validates what it is sent (else the tests above would prove little), and
    the sender reports the server's OperationOutcome."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**preliminary(reported), "status": "draft"}), encoding="utf-8")
    config = reported.study.config.fhir.model_copy(update={"url": reported.peer.url})
    with pytest.raises(FhirSendError) as refused:
        put_report(config, bad)
    assert "answered HTTP 400" in str(refused.value)
    assert "OperationOutcome: error invalid: DiagnosticReport.status 'draft'" in str(refused.value)
