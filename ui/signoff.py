"""The radiologist's sign-off: a new, verified Comprehensive 3D SR (TID 1500) built from the
review decisions, written to disk and queued to the PACS destinations (issue 7).

The document (PS3.3 A.35.13 Comprehensive 3D SR IOD; PS3.16 TID 1500), built with highdicom like
the AI SR (``inference/sr.py``, whose coordinate and library helpers it uses):

- COMPLETE, FINAL and VERIFIED: Verifying Observer Sequence with the radiologist's name (PN, see
  :func:`person_name`) and organisation (the account's, else the configured ``ui.organisation``;
  cut to the 64 characters of LO) and the verification time.
- Predecessor Documents Sequence: the AI SR at the first signing; an amendment (signing again
  after ``Reviews.reopen``) names the previous signed SR first, then the AI SR.
- Same study and patient (copied from the source images, as the AI SR); its own series
  (Series Number 9004, "Radiologist-verified nodule findings"), one instance per signing
  (Instance Number = the signing's number: 1, 2 for the first amendment, ...).
- Observation context (TID 1001/1002/1003): a person observer: name (PN), login name, the
  organisation, role in organisation (309343006, SCT, "Physician") (CID 7452) and role in
  procedure (121098, DCM, "Verifying") (CID 7453). No device observer: the model is named by
  Algorithm Identification (TID 4019) in each group it contributed to.
- Procedure reported (169069000, SCT, "CT of chest"); Image Library: the key slices.
- One TID 1501 group per included finding (accepted, edited, added; rejected and removed ones
  are left out), in the review's order, each with Finding (27925004, SCT, "Nodule"), Finding
  Site Lung, and a decision (below). Measurements are INFERRED FROM a SCOORD POINT on the key
  slice and a SCOORD3D POINT at the centre (OHIF draws the point):

  * AI findings keep the AI SR's Tracking Identifier (``Nodule <id>``) and Tracking Unique
    Identifier (read from the AI SR, so the groups match the AI SR's and the SEG's segments),
    the model's key slice and Algorithm Identification. Long axis (103339001, SCT) is the
    final diameter (the radiologist's where edited); Probability (122157, DCM) is the model's,
    in % as in the AI SR.
    Volume (118565006, SCT) only for accepted findings: an edited diameter makes the model's
    volume a measurement of a different lesion outline.
  * Added findings: Tracking Identifier ``Added nodule <n>`` and a new Tracking UID (stable
    across amendments), the image nearest the centre as key slice, Long axis only, no
    Algorithm Identification.
  * No included finding: no group, and a Qualitative Evaluations container with (27925004,
    SCT, "Nodule") = (272519000, SCT, "Absent"), like the AI SR's (``inference.sr``), which
    every viewer opens.

Codes of the decision. No concept for "a reader's verdict on an AI finding" was found among
the TID 1500/1501 value sets or in pydicom's DCM and SCT code dictionaries (the nearest, (122775,
DCM, "Agreement with prior findings"), is about prior studies), so a private coding scheme is
used, declared in the Coding Scheme Identification Sequence (PS3.16 Section 8: private scheme
designators begin with "99"; dciodvfy warns that it does not know the designator, and nothing
more):

  =============================  ===========  ============================================
  item                           code         meaning
  =============================  ===========  ============================================
  concept name (CONTAINS CODE)   DECISION     Radiologist decision
  value                          ACCEPTED     AI finding accepted by radiologist
  value                          EDITED       AI finding edited by radiologist
  value                          ADDED        Finding added by radiologist
  NUM, edited findings only      AILONGAXIS   Long axis measured by AI (mm): the model's
                                              diameter before the edit
  =============================  ===========  ============================================

all with Coding Scheme Designator ``99AIDX``. The decision is a TID 1501 qualitative
evaluation (``group.get_qualitative_evaluations(name=DECISION)``); the model's diameter of an
edited finding is a NUM of its own so that a reader asking for Long axis gets one value, the
final one.

UIDs (``pydicom.uid.generate_uid`` over a JSON list, as in ``inference/results_common.py``):
series ``("aidx-signed", AI SR SOP Instance UID, "series")``; instance ``("aidx-signed", AI SR
SOP Instance UID, "instance", n, digest)`` where n is the signing's number and digest a
SHA-256 of what the report says (signer, organisation, decisions, predecessors). The same
signing run again (after a crash before it was recorded) gives the same UID and rewrites the same
file (only the content and verification times differ); a signing that says something else gets
another UID, so a UID never stands for two different reports.

Order and retries: (1) refuse (:class:`~ui.accounts.PermissionDenied` for a non-radiologist,
:class:`~ui.review.ReviewError` when signed already, when a finding is undecided, or without an
organisation); (2) write the file atomically to ``out_dir/<Study UID>/<SOP UID>.dcm``;
(3) ``Reviews.record_signed`` (state, sign count, audit "sign"), which only one of two
concurrent signings wins: the loser removes its file (unless it is the winner's: the same
signing) and raises, having queued nothing; (4) queue
the file to each destination (outbox key ``signed:<SOP UID>``, idempotent). A crash between (3)
and (4) leaves a signed review whose report is not queued: the next ``sign`` call on it queues it
before refusing as already signed.

FHIR: with the ``fhir`` endpoint taking final reports, the DiagnosticReport of the signing
(``inference.fhir_report``: ``final``, or ``amended`` for an amendment; the same report as the
AI result's preliminary one) is built and validated after (2), written beside the SR as
``fhir-<SOP UID>.json``, and queued in (4) to the destination ``fhir``; the loser of two
concurrent signings removes it with its SR, and the crash between (3) and (4) is recovered alike.

Destinations: every destination the outbox holds the job's AI SR for (whether sent yet or
not); when there is none, ``fallback_destinations`` (``ui.signoff_destinations``); when there is
none either, the report is written and recorded but not queued, and the result says why.

Logs name studies and reports by UID only, never the patient.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from aidx.config_fhir import OUTBOX_DESTINATION
from aidx.store.schema import outbox
from aidx.store.store import Store
from inference.fhir_report import FhirSettings, build_report, item_key, read_sr, write_report
from inference.results_common import (  # noqa: F401  (the decision codes are re-exported)
    ACCEPTED,
    ADDED,
    AI_LONG_AXIS,
    CODING_SCHEME,
    DECISION,
    EDITED,
    LO_MAX,
    save_atomically,
    source_series,
)
from inference.volume import in_volume_order
from ui.accounts import PermissionDenied, User
from ui.review import REVIEWER_ROLES, ReviewCase, ReviewError, Reviews
from ui.signed_sr import (  # noqa: F401  (re-exported)
    PERSON,
    PHYSICIAN,
    PN_MAX,
    SIGNED_SR_DESCRIPTION,
    SIGNED_SR_SERIES_NUMBER,
    VERIFYING,
    Signer,
    _clean,
    _Model,
    _tracking_uids,
    _uid,
    build_signed_sr,
    person_name,
)

log = logging.getLogger("ui.signoff")


@dataclass(frozen=True)
class SignResult:
    """What one signing produced."""

    review_id: int
    sign_count: int  # 1 for the first signing, 2 for the first amendment, ...
    sr_uid: str
    sr_path: Path
    series_uid: str
    predecessor_uids: tuple[str, ...]  # previous signed SR (amendments), then the AI SR
    destinations: tuple[str, ...]  # where the report is queued; empty: not queued
    included: int  # findings in the report (accepted, edited, added)
    rejected: int  # the model's findings the radiologist rejected
    removed: int  # findings the radiologist added and removed again
    not_queued_reason: str | None = None
    fhir_queued: bool = False  # the FHIR DiagnosticReport (final or amended) is queued

    @property
    def queued(self) -> bool:
        return bool(self.destinations)


def sign(
    reviews: Reviews,
    store: Store,
    review_id: int,
    user: User,
    out_dir: Path,
    fallback_destinations: Sequence[str] = (),
    client: str | None = None,
    default_organisation: str = "",
    fhir: FhirSettings | None = None,
) -> SignResult:
    """Sign review ``review_id`` as ``user``: write the verified SR to
    ``out_dir/<Study UID>/<SOP Instance UID>.dcm`` (the app passes ``<data_dir>/signed``),
    record the signing (audited) and queue the report (see the module's docstring for the
    order, the destinations and the refusals).

    ``default_organisation``: the verifying organisation for a user without one
    (``ui.organisation``). ``fhir``: the FHIR endpoint takes final reports
    (``inference.fhir_settings(config, "final")``): the DiagnosticReport is written beside the
    SR and queued with it. Raises PermissionDenied or ReviewError with what to do.
    """
    if user.role not in REVIEWER_ROLES:
        raise PermissionDenied(f"role {user.role!r} cannot sign; a radiologist must")
    case = reviews.case(review_id)
    if case.state == "signed":
        _queue_recorded(store, case, fallback_destinations, fhir is not None)
        raise ReviewError(
            f"this study is already signed (report {case.signed_sr_uid}); re-open it to amend"
        )
    findings = reviews.findings(review_id)
    pending = [f.key for f in findings if f.status == "pending"]
    if pending:
        raise ReviewError(
            f"{len(pending)} of {len(findings)} findings are still undecided "
            f"({', '.join(pending)}): accept, edit or reject each before signing"
        )
    organisation = _clean(user.organisation or default_organisation)[:LO_MAX].strip()
    if not organisation:
        raise ReviewError(
            f"no verifying organisation: account {user.username!r} has none and "
            "ui.organisation is not set; an administrator sets one of them"
        )
    name = person_name(user.display_name, user.username)

    ai_sr = _read_ai_sr(case)
    predecessors = [*_previous_signed(case), ai_sr]
    predecessor_uids = tuple(str(p.SOPInstanceUID) for p in predecessors)
    series = source_series(*in_volume_order(_source_datasets(store, case, ai_sr)))
    number = case.sign_count + 1
    digest = hashlib.sha256(
        json.dumps(
            [
                user.username,
                name,
                organisation,
                number,
                predecessor_uids,
                [
                    [f.key, f.status, round(f.diameter_mm, 3), [round(v, 3) for v in f.center_mm]]
                    for f in findings
                ],
            ]
        ).encode()
    ).hexdigest()
    sr_uid = _uid(case.sr_sop_uid, "instance", str(number), digest)
    series_uid = _uid(case.sr_sop_uid, "series")
    report = build_signed_sr(
        findings,
        series,
        ai_sr,
        case,
        signer=Signer(name, organisation, user.username),
        sop_instance_uid=sr_uid,
        series_instance_uid=series_uid,
        instance_number=number,
        previous_versions=predecessors,
    )
    path = Path(out_dir) / case.study_uid / f"{sr_uid}.dcm"
    save_atomically(report, path)
    fhir_report: dict[str, Any] | None = None
    fhir_path: Path | None = None
    if fhir is not None:
        # Built (and validated) before the signing is recorded: an invalid one is a bug that
        # refuses the signing rather than recording a report the EMR never gets.
        try:
            fhir_report = build_report(ai_sr, case.model, fhir, datetime.now(UTC), read_sr(path))
            fhir_path = write_report(fhir_report, path.parent)
        except BaseException:
            path.unlink(missing_ok=True)  # nothing recorded, nothing left behind
            raise

    destinations = signed_destinations(store, case, fallback_destinations)
    included = [f for f in findings if f.included]
    rejected = sum(1 for f in findings if f.status == "rejected")
    removed = sum(1 for f in findings if f.status == "removed")
    detail = {
        "predecessors": list(predecessor_uids),
        "included": len(included),
        "rejected": rejected,
        "removed": removed,
        "destinations": list(destinations),
    }
    try:
        recorded = reviews.record_signed(review_id, user, sr_uid, path, detail, client)
    except ReviewError:
        # Another signing of this review won: its report is the one recorded and queued.
        winner = reviews.case(review_id).signed_sr_path
        if winner is None or winner.resolve() != path.resolve():
            path.unlink(missing_ok=True)
            if fhir_path is not None:
                fhir_path.unlink(missing_ok=True)
        raise
    for destination in destinations:
        store.enqueue(destination, _item_key(sr_uid), [str(path)], case.study_uid, series_uid)
    if fhir_report is not None and fhir_path is not None:
        store.enqueue(
            OUTBOX_DESTINATION, item_key(fhir_report), [str(fhir_path)], case.study_uid, series_uid
        )
    reason = None
    if not destinations:
        reason = (
            "the AI result was sent to no destination and no sign-off destination is "
            "configured (ui.signoff_destinations): the signed report is on disk only"
        )
    log.info(
        "review %d signed: study_uid=%s sr_uid=%s sign_count=%d included=%d rejected=%d "
        "destinations=%s%s",
        review_id,
        case.study_uid,
        sr_uid,
        recorded.sign_count,
        len(included),
        rejected,
        ",".join(destinations) or "-",
        " fhir=queued" if fhir_report is not None else "",
    )
    return SignResult(
        review_id=review_id,
        sign_count=recorded.sign_count,
        sr_uid=sr_uid,
        sr_path=path,
        series_uid=series_uid,
        predecessor_uids=predecessor_uids,
        destinations=destinations,
        included=len(included),
        rejected=rejected,
        removed=removed,
        not_queued_reason=reason,
        fhir_queued=fhir_report is not None,
    )


def signed_destinations(
    store: Store, case: ReviewCase, fallback: Sequence[str] = ()
) -> tuple[str, ...]:
    """Where the signed report of ``case`` goes: each destination the outbox holds the AI SR of
    the case's job for; if none, ``fallback`` (in its order, without repeats)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(outbox.c.destination, outbox.c.files).where(outbox.c.job_id == case.job_id)
        ).all()
    sr = str(case.sr_path)
    followed = sorted({r.destination for r in rows if sr in json.loads(r.files)})
    if followed:
        return tuple(followed)
    return tuple(dict.fromkeys(d for d in fallback if d))


def _read_ai_sr(case: ReviewCase) -> hd.sr.Comprehensive3DSR:
    try:
        sr = hd.sr.srread(case.sr_path)
    except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
        raise ReviewError(
            f"the AI SR {case.sr_sop_uid} cannot be read at {case.sr_path}: {exc}"
        ) from exc
    if not isinstance(sr, hd.sr.Comprehensive3DSR) or str(sr.SOPInstanceUID) != case.sr_sop_uid:
        raise ReviewError(
            f"{case.sr_path} is not the AI SR {case.sr_sop_uid} of this result; it was replaced"
        )
    return sr


def _previous_signed(case: ReviewCase) -> list[Dataset]:
    """The previous signed SR of an amendment (none at the first signing)."""
    if case.signed_sr_uid is None or case.signed_sr_path is None:
        return []
    try:
        ds = dcmread(case.signed_sr_path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise ReviewError(
            f"the previous signed report {case.signed_sr_uid} cannot be read at "
            f"{case.signed_sr_path}: {exc}; restore it to sign the amendment"
        ) from exc
    if str(ds.SOPInstanceUID) != case.signed_sr_uid:
        raise ReviewError(
            f"{case.signed_sr_path} is not the signed report {case.signed_sr_uid}; restore it"
        )
    return [ds]


def _source_datasets(store: Store, case: ReviewCase, ai_sr: Dataset) -> list[Dataset]:
    """Headers of the images the AI SR lists as evidence (those the model saw), from the store
    (a multi-frame instance once)."""
    wanted = [
        str(sop.ReferencedSOPInstanceUID)
        for study in ai_sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        if str(series.SeriesInstanceUID) == case.series_uid
        for sop in series.get("ReferencedSOPSequence", [])
    ]
    paths = {i["sop_uid"]: i["path"] for i in store.study_instances(case.study_uid)}
    missing = [uid for uid in wanted if uid not in paths]
    if not wanted or missing:
        raise ReviewError(
            f"the images of series {case.series_uid} are not all in the store "
            f"({len(missing)} of {len(wanted)} missing); the report cannot be built"
        )
    datasets: list[Dataset] = []
    for uid in wanted:
        try:
            datasets.append(dcmread(paths[uid], stop_before_pixels=True))
        except (OSError, InvalidDicomError) as exc:
            raise ReviewError(f"image {uid} cannot be read at {paths[uid]}: {exc}") from exc
    return datasets


def _queue_recorded(
    store: Store, case: ReviewCase, fallback: Sequence[str], fhir: bool = False
) -> None:
    """Queue the recorded signed report where it is not queued yet (a crash between recording
    and queueing), and its FHIR report (``fhir``) if it was written; enqueue is idempotent, so
    this does nothing otherwise."""
    if case.signed_sr_uid is None or case.signed_sr_path is None:
        return
    if not case.signed_sr_path.is_file():
        log.error(
            "review %d: signed report %s is missing at %s",
            case.review_id,
            case.signed_sr_uid,
            case.signed_sr_path,
        )
        return
    series_uid = _uid(case.sr_sop_uid, "series")
    for destination in signed_destinations(store, case, fallback):
        _, new = store.enqueue(
            destination,
            _item_key(case.signed_sr_uid),
            [str(case.signed_sr_path)],
            case.study_uid,
            series_uid,
        )
        if new:
            log.warning(
                "review %d: signed report %s was not queued; queued to %s now",
                case.review_id,
                case.signed_sr_uid,
                destination,
            )
    fhir_path = case.signed_sr_path.parent / f"fhir-{case.signed_sr_uid}.json"
    if fhir and fhir_path.is_file():
        report = json.loads(fhir_path.read_bytes())
        _, new = store.enqueue(
            OUTBOX_DESTINATION, item_key(report), [str(fhir_path)], case.study_uid, series_uid
        )
        if new:
            log.warning(
                "review %d: the FHIR report of %s was not queued; queued now",
                case.review_id,
                case.signed_sr_uid,
            )


def _item_key(sr_uid: str) -> str:
    return f"signed:{sr_uid}"
