"""Radiologist review of AI results: worklist, per-finding decisions and review state (issue 7).

Gradio-free and torch-free: the web app (ui/app.py), the sign-off (ui/signoff.py), the dashboard
(ui/dashboard.py) and ``aidx feedback export`` (training/feedback.py) read and write reviews
through this module, so every decision has one path into the store.

- One review per AI result (``results`` row: study, series, model version, study version),
  created when the worklist is read. States: ``new`` -> ``in_review`` (first opened) ->
  ``signed``; re-opening a signed review for an amendment puts it back ``in_review``.
- Decisions are appended, never updated (table ``decisions``); a finding's state is its latest
  decision. Each is committed before the call returns, so closing the browser loses nothing.
  Keys: ``ai-<id>`` for the model's findings (ids of findings.json), ``added-<n>`` for findings a
  radiologist adds (centre in patient coordinates, LPS mm, and a diameter).
- Every view and decision is also written to the audit log (ui.audit), naming studies by UID.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import and_, func, select

from aidx.store.schema import decisions, jobs, patients, results, reviews, studies
from aidx.store.store import Store
from inference.findings import Finding, FindingsReport
from ui.accounts import PermissionDenied, User
from ui.audit import Audit
from ui.identification import PatientIdentification, patient_identification

ReviewState = Literal["new", "in_review", "signed"]
FindingStatus = Literal["pending", "accepted", "rejected", "edited", "added", "removed"]
Point = tuple[float, float, float]

REVIEWER_ROLES = ("radiologist",)  # who may decide and sign
_ACTION_STATUS: dict[str, FindingStatus] = {
    "accept": "accepted",
    "reject": "rejected",
    "edit": "edited",
    "add": "added",
    "remove": "removed",
    "reset": "pending",
}
_SHOWN_JOB_STATES = ("results_ready", "sent")  # superseded and failed jobs are not reviewed
MAX_DIAMETER_MM = 300.0


class ReviewError(ValueError):
    """A review action that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class WorklistRow:
    review_id: int
    result_id: int
    study_uid: str
    series_uid: str
    model: str
    study_version: int
    priority: int
    status: ReviewState
    finding_count: int
    max_probability: float | None
    received_at: float  # last image received
    result_at: float  # AI result written
    signed_at: float | None
    patient_name: str  # for the radiologist's screen only: never logged
    patient_id: str
    accession_number: str
    study_date: str
    description: str


@dataclass(frozen=True)
class ReviewCase:
    review_id: int
    result_id: int
    job_id: int
    study_uid: str
    series_uid: str
    model: str  # name@version
    study_version: int
    state: ReviewState
    findings_path: Path
    sr_path: Path
    sr_sop_uid: str
    seg_path: Path | None
    sign_count: int
    signed_by: str | None
    signed_at: float | None
    signed_sr_uid: str | None
    signed_sr_path: Path | None

    @property
    def model_name(self) -> str:
        return self.model.rsplit("@", 1)[0]

    @property
    def model_version(self) -> str:
        return self.model.rsplit("@", 1)[-1]


@dataclass(frozen=True)
class ReviewedFinding:
    """A finding as the review sees it now: the model's (with its original record) or added."""

    key: str
    source: Literal["ai", "added"]
    ai: Finding | None  # the model's record (None for an added finding)
    center_mm: Point
    diameter_mm: float  # the edited diameter where edited
    status: FindingStatus
    reason: str | None
    decided_by: str | None
    decided_role: str | None
    decided_at: float | None

    @property
    def probability(self) -> float | None:
        return self.ai.probability if self.ai is not None else None

    @property
    def included(self) -> bool:
        """In the signed report (and a positive label for retraining)."""
        return self.status in ("accepted", "edited", "added")


class Reviews:
    """Review operations on the store. ``clock`` gives the time; tests pass their own."""

    def __init__(
        self, store: Store, audit: Audit | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock
        self.audit = audit or Audit(store, clock)

    # -------------------------------------------------------------------------------- reading
    def sync(self) -> int:
        """Create a ``new`` review for each reviewable AI result lacking one; returns how many."""
        now = self._clock()
        with self._store._write() as conn:
            rows = conn.execute(
                select(results.c.id, results.c.study_uid)
                .join(jobs, jobs.c.id == results.c.job_id)
                .outerjoin(reviews, reviews.c.result_id == results.c.id)
                .where(jobs.c.state.in_(_SHOWN_JOB_STATES) & reviews.c.id.is_(None))
                .where(results.c.shadow.is_(False))  # a challenger's results are not reviewed
            ).all()
            for result_id, study_uid in rows:
                conn.execute(
                    reviews.insert().values(
                        result_id=result_id,
                        study_uid=study_uid,
                        state="new",
                        created_at=now,
                        updated_at=now,
                        sign_count=0,
                    )
                )
        return len(rows)

    def worklist(self, status: str | None = None, search: str | None = None) -> list[WorklistRow]:
        """Reviews of results of jobs not superseded, highest priority first, then oldest
        result first. ``status`` filters by review state; ``search`` matches patient name or
        ID, accession number, study description or study UID (case-insensitive)."""
        self.sync()
        query = (
            select(
                reviews.c.id,
                reviews.c.result_id,
                reviews.c.study_uid,
                reviews.c.state,
                reviews.c.signed_at,
                results.c.series_uid,
                results.c.model,
                results.c.study_version,
                results.c.finding_count,
                results.c.max_probability,
                results.c.created_at,
                jobs.c.priority,
                studies.c.last_arrival,
                studies.c.accession_number,
                studies.c.study_date,
                studies.c.description,
                patients.c.patient_name,
                patients.c.patient_id,
            )
            .join(results, results.c.id == reviews.c.result_id)
            .join(jobs, jobs.c.id == results.c.job_id)
            .join(studies, studies.c.study_uid == reviews.c.study_uid)
            .join(patients, patients.c.id == studies.c.patient_pk)
            .where(jobs.c.state.in_(_SHOWN_JOB_STATES) & results.c.shadow.is_(False))
            .order_by(jobs.c.priority.desc(), results.c.created_at, reviews.c.id)
        )
        if status:
            if status not in ("new", "in_review", "signed"):
                raise ReviewError(f"unknown review status {status!r}: new, in_review or signed")
            query = query.where(reviews.c.state == status)
        with self._store.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = [
            WorklistRow(
                review_id=r.id,
                result_id=r.result_id,
                study_uid=r.study_uid,
                series_uid=r.series_uid,
                model=r.model,
                study_version=r.study_version,
                priority=r.priority,
                status=r.state,
                finding_count=r.finding_count,
                max_probability=r.max_probability,
                received_at=r.last_arrival,
                result_at=r.created_at,
                signed_at=r.signed_at,
                patient_name=str(r.patient_name or ""),
                patient_id=str(r.patient_id or ""),
                accession_number=str(r.accession_number or ""),
                study_date=str(r.study_date or ""),
                description=str(r.description or ""),
            )
            for r in rows
        ]
        if search:
            needle = search.strip().lower()
            out = [
                w
                for w in out
                if any(
                    needle in v.lower()
                    for v in (
                        w.patient_name,
                        w.patient_id,
                        w.accession_number,
                        w.description,
                        w.study_uid,
                    )
                )
            ]
        return out

    def identification(self, review_id: int) -> PatientIdentification:
        """The patient and study of a review (what a viewer shows in its corners)."""
        found = patient_identification(self._store, review_id)
        if found is None:
            raise ReviewError(f"no review {review_id}")
        return found

    def case(self, review_id: int) -> ReviewCase:
        with self._store.engine.connect() as conn:
            r = conn.execute(
                select(
                    reviews,
                    results.c.job_id,
                    results.c.series_uid,
                    results.c.model,
                    results.c.study_version,
                    results.c.findings_path,
                    results.c.sr_path,
                    results.c.sr_sop_uid,
                    results.c.seg_path,
                )
                .join(results, results.c.id == reviews.c.result_id)
                .where(reviews.c.id == review_id)
            ).first()
        if r is None:
            raise ReviewError(f"no review {review_id}")
        m = r._mapping
        return ReviewCase(
            review_id=m["id"],
            result_id=m["result_id"],
            job_id=m["job_id"],
            study_uid=m["study_uid"],
            series_uid=m["series_uid"],
            model=m["model"],
            study_version=m["study_version"],
            state=m["state"],
            findings_path=Path(m["findings_path"]),
            sr_path=Path(m["sr_path"]),
            sr_sop_uid=m["sr_sop_uid"],
            seg_path=Path(m["seg_path"]) if m["seg_path"] else None,
            sign_count=m["sign_count"],
            signed_by=m["signed_by"],
            signed_at=m["signed_at"],
            signed_sr_uid=m["signed_sr_uid"],
            signed_sr_path=Path(m["signed_sr_path"]) if m["signed_sr_path"] else None,
        )

    def findings(self, review_id: int) -> list[ReviewedFinding]:
        """The model's findings (in findings.json order) then the added ones, each with its
        latest decision."""
        case = self.case(review_id)
        report = FindingsReport.read(case.findings_path)
        latest = self._latest(review_id)
        out: list[ReviewedFinding] = []
        for f in report.findings:
            d = latest.get(f"ai-{f.id}")
            out.append(_reviewed(f"ai-{f.id}", f, f.center_mm, f.diameter_mm, d))
        for key, d in latest.items():
            if key.startswith("added-"):
                center = (float(d["center_x"]), float(d["center_y"]), float(d["center_z"]))
                out.append(_reviewed(key, None, center, float(d["diameter_mm"]), d))
        return out

    def decision_history(
        self, review_id: int | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Every decision row (oldest first), for the dashboard and the feedback export."""
        query = select(decisions).order_by(decisions.c.id)
        if review_id is not None:
            query = query.where(decisions.c.review_id == review_id)
        if since is not None:
            query = query.where(decisions.c.at >= since)
        with self._store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def signed(self, since: float | None = None) -> list[ReviewCase]:
        """Reviews signed at least once (``since``: signed at or after), oldest first."""
        query = select(reviews.c.id).where(reviews.c.sign_count > 0).order_by(reviews.c.signed_at)
        if since is not None:
            query = query.where(reviews.c.signed_at >= since)
        with self._store.engine.connect() as conn:
            ids = [int(r[0]) for r in conn.execute(query)]
        return [self.case(i) for i in ids]

    # -------------------------------------------------------------------------------- writing
    def open(self, review_id: int, user: User, client: str | None = None) -> ReviewCase:
        """A reviewer opens the study: ``new`` becomes ``in_review``; the view is audited."""
        now = self._clock()
        case = self.case(review_id)
        if case.state == "new" and user.role in REVIEWER_ROLES:
            with self._store._write() as conn:
                conn.execute(
                    reviews.update()
                    .where((reviews.c.id == review_id) & (reviews.c.state == "new"))
                    .values(state="in_review", opened_at=now, updated_at=now)
                )
        self.audit.record(
            user.username,
            user.role,
            "study_view",
            case.study_uid,
            {"review": review_id, "result": case.result_id},
            client,
        )
        return self.case(review_id)

    def decide(
        self,
        review_id: int,
        key: str,
        action: str,
        user: User,
        *,
        reason: str | None = None,
        diameter_mm: float | None = None,
        client: str | None = None,
    ) -> ReviewedFinding:
        """Record ``action`` (accept, reject, edit, remove, reset) on finding ``key``."""
        if action not in ("accept", "reject", "edit", "remove", "reset"):
            raise ReviewError(f"unknown action {action!r}: accept, reject, edit, remove or reset")
        current = {f.key: f for f in self.findings(review_id)}
        if key not in current:
            raise ReviewError(f"review {review_id} has no finding {key!r}")
        if action == "remove" and current[key].source != "added":
            raise ReviewError("only an added finding can be removed; reject a model's finding")
        if action == "edit":
            diameter_mm = _diameter(diameter_mm)
        elif action == "accept" and current[key].status == "edited":
            diameter_mm = current[key].diameter_mm  # accepting keeps the edited diameter
        if action == "reject" and reason is not None:
            reason = reason.strip()[:500] or None
        finding = current[key]
        center = finding.center_mm if finding.source == "added" else None
        action_row = action
        if finding.source == "added":  # its rows carry its centre and diameter
            diameter_mm = diameter_mm if action == "edit" else finding.diameter_mm
            if action in ("accept", "edit", "reset"):
                action_row = "add"  # an added finding stays added; edit changes its diameter
        self._append(
            review_id,
            key,
            action_row,
            user,
            reason,
            diameter_mm,
            center,
            client,
            audit_action=action,
        )
        return {f.key: f for f in self.findings(review_id)}[key]

    def add(
        self,
        review_id: int,
        center_mm: Sequence[float],
        diameter_mm: float,
        user: User,
        client: str | None = None,
    ) -> ReviewedFinding:
        """A finding the model missed: centre in patient coordinates (LPS mm), diameter in mm."""
        center = tuple(float(v) for v in center_mm)
        if len(center) != 3 or not all(math.isfinite(v) for v in center):
            raise ReviewError("the centre must be three finite coordinates in mm")
        diameter = _diameter(diameter_mm)
        n = 1 + sum(1 for k in self._latest(review_id) if k.startswith("added-"))
        key = f"added-{n}"
        self._append(
            review_id,
            key,
            "add",
            user,
            None,
            diameter,
            (center[0], center[1], center[2]),
            client,
            audit_action="add",
        )
        return {f.key: f for f in self.findings(review_id)}[key]

    def reopen(self, review_id: int, user: User, client: str | None = None) -> ReviewCase:
        """Re-open a signed review to amend it (the next sign-off names the previous SR)."""
        self._require_reviewer(user)
        case = self.case(review_id)
        if case.state != "signed":
            raise ReviewError("only a signed study can be re-opened")
        now = self._clock()
        with self._store._write() as conn:
            conn.execute(
                reviews.update()
                .where(reviews.c.id == review_id)
                .values(state="in_review", updated_at=now)
            )
        self.audit.record(
            user.username,
            user.role,
            "reopen",
            case.study_uid,
            {"review": review_id, "signed_sr": case.signed_sr_uid},
            client,
        )
        return self.case(review_id)

    def record_signed(
        self,
        review_id: int,
        user: User,
        sr_uid: str,
        sr_path: Path,
        detail: dict[str, Any] | None = None,
        client: str | None = None,
    ) -> ReviewCase:
        """Mark the review signed with the signed SR just written (ui.signoff calls this)."""
        self._require_reviewer(user)
        now = self._clock()
        with self._store._write() as conn:
            updated = conn.execute(
                reviews.update()
                .where((reviews.c.id == review_id) & (reviews.c.state != "signed"))
                .values(
                    state="signed",
                    signed_by=user.username,
                    signed_at=now,
                    signed_sr_uid=sr_uid,
                    signed_sr_path=str(sr_path),
                    sign_count=reviews.c.sign_count + 1,
                    updated_at=now,
                )
            ).rowcount
        if not updated:
            raise ReviewError("this study is already signed; re-open it to amend")
        case = self.case(review_id)
        self.audit.record(
            user.username,
            user.role,
            "sign",
            case.study_uid,
            {"review": review_id, "sr": sr_uid, **(detail or {})},
            client,
        )
        return case

    # ------------------------------------------------------------------------------ internals
    def _require_reviewer(self, user: User) -> None:
        if user.role not in REVIEWER_ROLES:
            raise PermissionDenied(f"role {user.role!r} cannot review; a radiologist must")

    def _append(
        self,
        review_id: int,
        key: str,
        action: str,
        user: User,
        reason: str | None,
        diameter_mm: float | None,
        center: Point | None,
        client: str | None,
        *,
        audit_action: str,
    ) -> None:
        self._require_reviewer(user)
        case = self.case(review_id)
        if case.state == "signed":
            raise ReviewError("this study is signed; re-open it to amend")
        now = self._clock()
        with self._store._write() as conn:
            conn.execute(
                decisions.insert().values(
                    review_id=review_id,
                    finding_key=key,
                    action=action,
                    reason=reason,
                    diameter_mm=diameter_mm,
                    center_x=center[0] if center else None,
                    center_y=center[1] if center else None,
                    center_z=center[2] if center else None,
                    username=user.username,
                    role=user.role,
                    at=now,
                )
            )
            if case.state == "new":
                conn.execute(
                    reviews.update()
                    .where(reviews.c.id == review_id)
                    .values(state="in_review", opened_at=now, updated_at=now)
                )
            else:
                conn.execute(
                    reviews.update().where(reviews.c.id == review_id).values(updated_at=now)
                )
        detail: dict[str, Any] = {"review": review_id, "finding": key}
        if diameter_mm is not None:
            detail["diameter_mm"] = round(diameter_mm, 2)
        if reason:
            detail["reason"] = reason
        self.audit.record(
            user.username, user.role, f"finding_{audit_action}", case.study_uid, detail, client
        )

    def _latest(self, review_id: int) -> dict[str, dict[str, Any]]:
        """The latest decision row per finding key (in first-decided order)."""
        newest = (
            select(decisions.c.finding_key, func.max(decisions.c.id).label("last"))
            .where(decisions.c.review_id == review_id)
            .group_by(decisions.c.finding_key)
            .subquery()
        )
        with self._store.engine.connect() as conn:
            rows = conn.execute(
                select(decisions)
                .join(newest, and_(decisions.c.id == newest.c.last))
                .order_by(decisions.c.finding_key)
            ).all()
        latest = {r.finding_key: dict(r._mapping) for r in rows}

        def order(key: str) -> tuple[int, int]:
            kind, _, n = key.partition("-")
            return (0 if kind == "ai" else 1, int(n) if n.isdigit() else 0)

        return {k: latest[k] for k in sorted(latest, key=order)}


def _reviewed(
    key: str, ai: Finding | None, center: Point, diameter: float, d: dict[str, Any] | None
) -> ReviewedFinding:
    status: FindingStatus = "pending" if d is None else _ACTION_STATUS[d["action"]]
    if d is not None and d["diameter_mm"] is not None and d["action"] in ("edit", "accept", "add"):
        diameter = float(d["diameter_mm"])
    if ai is not None and status == "accepted" and abs(diameter - ai.diameter_mm) > 1e-6:
        status = "edited"  # accepted after an edit: the diameter is the radiologist's
    return ReviewedFinding(
        key=key,
        source="ai" if ai is not None else "added",
        ai=ai,
        center_mm=center,
        diameter_mm=diameter,
        status=status,
        reason=d["reason"] if d else None,
        decided_by=d["username"] if d else None,
        decided_role=d["role"] if d else None,
        decided_at=d["at"] if d else None,
    )


def _diameter(value: float | None) -> float:
    try:
        diameter = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ReviewError("enter the diameter in mm (a number)") from None
    if not (0.0 < diameter <= MAX_DIAMETER_MM) or not math.isfinite(diameter):
        raise ReviewError(f"the diameter must be above 0 and at most {MAX_DIAMETER_MM:g} mm")
    return diameter
