"""The data behind the review app's dashboard: turnaround times (receipt -> AI result ->
sign-off), acceptance and rejection rates per model version, and findings per study.

Gradio-free: each function returns a pandas DataFrame whose columns suit ``gr.BarPlot``,
``gr.LinePlot`` and ``gr.ScatterPlot`` (times as naive local datetimes, durations in minutes,
rates as fractions 0-1), or a plain dict for the summary. An empty store gives empty frames with
the same columns, so the app shows empty plots. Studies are named by UID; no patient data is
returned.

The reviews come from :class:`ui.review.Reviews`: its worklist decides which AI results count
(those of jobs not superseded or failed) and ``Reviews.findings`` gives each finding's final
status (its latest decision), so the dashboard counts exactly what the reviewer saw.

Definitions:

- receipt: the last image of the study version the result was made from. That is
  ``studies.last_arrival``, unless images arrived after this version completed (a later
  version); then it is the last instance received before the version's job was created.
- AI result: ``results.created_at``.
- sign-off: the first signing of the review (an amendment does not restart the clock).
- ``since`` (seconds since the epoch, or a datetime; a naive one is local time): results whose
  receipt is at or after it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import pandas as pd
from sqlalchemy import and_, func, select

from aidx.store.schema import instances, jobs, results, reviews, studies
from aidx.store.store import Store
from ui.audit import Audit
from ui.review import Reviews, WorklistRow

# Stages of the turnaround, as the ``stage`` values of turnaround_stages (the app labels them).
STAGES: Final = ("receipt_to_result", "result_to_signoff", "receipt_to_signoff")
# The counts of findings_long, as its ``kind`` values.
FINDING_KINDS: Final = ("ai_findings", "accepted", "added")

_TIMES: Final = ("received_at", "result_at", "signed_at")
TURNAROUND_COLUMNS: Final = (
    "review_id",
    "study_uid",
    "model",
    "study_version",
    "status",  # review state: new, in_review, signed
    "sign_count",
    *_TIMES,
    *(f"{s}_min" for s in STAGES),
    "inference_s",
)
STAGE_COLUMNS: Final = ("review_id", "study_uid", "received_at", "stage", "minutes")
RATE_COLUMNS: Final = (
    "model",  # name@version
    "results",
    "findings",  # the model's findings
    "decided",  # accepted + rejected
    "accepted",  # including edited
    "edited",
    "rejected",
    "pending",  # undecided: counted, not in the rates
    "added",  # findings the model missed, added by the radiologist
    "acceptance_rate",  # accepted / decided (NaN when none decided)
    "rejection_rate",  # rejected / decided
)
STUDY_COLUMNS: Final = (
    "review_id",
    "study_uid",
    "model",
    "study_version",
    "received_at",
    "status",
    "ai_findings",
    "accepted",
    "edited",
    "rejected",
    "pending",
    "added",
)
FINDING_LONG_COLUMNS: Final = ("review_id", "study_uid", "received_at", "kind", "count")

_COUNTS: Final = ("ai_findings", "accepted", "edited", "rejected", "pending", "added")

Source = Store | Reviews
Since = datetime | float | None


@dataclass(frozen=True)
class _Reviewed:
    """One AI result on the worklist, with the times the dashboard needs."""

    row: WorklistRow
    received_at: float  # receipt of this study version
    signed_at: float | None  # first sign-off
    sign_count: int
    inference_s: float | None


# ------------------------------------------------------------------------------------ frames


def turnaround(source: Source, since: Since = None) -> pd.DataFrame:
    """One row per AI result on the worklist, signed or not, oldest receipt first
    (TURNAROUND_COLUMNS): times as datetimes, ``<stage>_min`` durations in minutes (NaN until
    signed), ``inference_s`` the job's model time."""
    store, reviews_ = _open(source)
    return _turnaround(_reviewed(store, reviews_, since))


def turnaround_stages(frame: pd.DataFrame) -> pd.DataFrame:
    """``turnaround`` in long format for a plot with one colour per stage (STAGE_COLUMNS):
    one row per result and stage reached (``stage`` is one of STAGES)."""
    long = frame.melt(
        id_vars=["review_id", "study_uid", "received_at"],
        value_vars=[f"{s}_min" for s in STAGES],
        var_name="stage",
        value_name="minutes",
    ).dropna(subset=["minutes"])
    long["stage"] = long["stage"].str.removesuffix("_min")
    return _frame(long.to_dict("records"), STAGE_COLUMNS)


def findings_per_study(source: Source, since: Since = None) -> pd.DataFrame:
    """One row per AI result (a study has one per version, series and model), oldest receipt
    first (STUDY_COLUMNS): the model's findings and the final count of each status; ``accepted``
    includes ``edited``; ``added`` are the radiologist's own (removed ones not counted)."""
    store, reviews_ = _open(source)
    return _per_study(reviews_, _reviewed(store, reviews_, since))


def findings_long(frame: pd.DataFrame) -> pd.DataFrame:
    """``findings_per_study`` in long format for grouped bars (FINDING_LONG_COLUMNS): one row
    per result and kind (``kind`` is one of FINDING_KINDS)."""
    long = frame.melt(
        id_vars=["review_id", "study_uid", "received_at"],
        value_vars=list(FINDING_KINDS),
        var_name="kind",
        value_name="count",
    )
    return _frame(long.to_dict("records"), FINDING_LONG_COLUMNS)


def decision_rates(source: Source, since: Since = None) -> pd.DataFrame:
    """Per model version (RATE_COLUMNS), the one whose first result was received first at the
    top: the final status of every finding of its results; rates over decided findings only."""
    return _rates(findings_per_study(source, since))


def summary(source: Source, since: Since = None) -> dict[str, int | float | None]:
    """Headline figures: studies received (in the index, AI result or not), AI results on the
    worklist, signed (at least once), awaiting sign-off, the median minutes of each stage, and
    the findings decided with the overall acceptance and rejection rates (None where there is
    nothing to count)."""
    store, reviews_ = _open(source)
    rows = _reviewed(store, reviews_, since)
    times = _turnaround(rows)
    per_study = _per_study(reviews_, rows)
    query = select(func.count()).select_from(studies)
    if since is not None:
        query = query.where(studies.c.last_arrival >= _epoch(since))
    with store.engine.connect() as conn:
        received = int(conn.execute(query).scalar_one())
    signed = int((times["sign_count"] > 0).sum())
    out: dict[str, int | float | None] = {
        "studies_received": received,
        "ai_results": len(times),
        "signed": signed,
        "awaiting_signoff": len(times) - signed,
    }
    for stage in STAGES:
        out[f"median_{stage}_min"] = _number(times[f"{stage}_min"].median())
    accepted, rejected = int(per_study["accepted"].sum()), int(per_study["rejected"].sum())
    decided = accepted + rejected
    out["findings_decided"] = decided
    out["acceptance_rate"] = accepted / decided if decided else None
    out["rejection_rate"] = rejected / decided if decided else None
    return out


# --------------------------------------------------------------------------------- internals


def _open(source: Source) -> tuple[Store, Reviews]:
    if isinstance(source, Reviews):
        return source._store, source  # the store the app's Reviews reads and writes
    return source, Reviews(source)


def _turnaround(rows: Sequence[_Reviewed]) -> pd.DataFrame:
    records = []
    for r in rows:
        result_at, signed = r.row.result_at, r.signed_at
        records.append(
            {
                "review_id": r.row.review_id,
                "study_uid": r.row.study_uid,
                "model": r.row.model,
                "study_version": r.row.study_version,
                "status": r.row.status,
                "sign_count": r.sign_count,
                "received_at": _local(r.received_at),
                "result_at": _local(result_at),
                "signed_at": _local(signed) if signed is not None else None,
                "receipt_to_result_min": _minutes(r.received_at, result_at),
                "result_to_signoff_min": _minutes(result_at, signed),
                "receipt_to_signoff_min": _minutes(r.received_at, signed),
                "inference_s": r.inference_s,
            }
        )
    return _frame(records, TURNAROUND_COLUMNS)


def _per_study(reviews_: Reviews, rows: Sequence[_Reviewed]) -> pd.DataFrame:
    records = [
        {
            "review_id": r.row.review_id,
            "study_uid": r.row.study_uid,
            "model": r.row.model,
            "study_version": r.row.study_version,
            "received_at": _local(r.received_at),
            "status": r.row.status,
            **_counts(reviews_, r.row.review_id),
        }
        for r in rows
    ]
    return _frame(records, STUDY_COLUMNS)


def _reviewed(store: Store, reviews_: Reviews, since: Since) -> list[_Reviewed]:
    """The worklist's results with receipt, first sign-off and job figures: a few queries in
    all, whatever the number of results."""
    rows = reviews_.worklist()
    if not rows:
        return []
    with store.engine.connect() as conn:
        job_rows = conn.execute(
            select(
                reviews.c.id,
                reviews.c.sign_count,
                jobs.c.id.label("job_id"),
                jobs.c.created_at,
                jobs.c.inference_s,
            )
            .join(results, results.c.id == reviews.c.result_id)
            .join(jobs, jobs.c.id == results.c.job_id)
        ).all()
        job = {r.id: r for r in job_rows}
        # Images that arrived after a version completed moved the study's last_arrival past
        # that version's job: its receipt is the last instance received before the job.
        overtaken = {
            job[w.review_id].job_id for w in rows if w.received_at > job[w.review_id].created_at
        }
        receipt: dict[int, float] = {}
        if overtaken:
            receipt = {
                int(j): float(t)
                for j, t in conn.execute(
                    select(jobs.c.id, func.max(instances.c.received_at))
                    .join(
                        instances,
                        and_(
                            instances.c.study_uid == jobs.c.study_uid,
                            instances.c.received_at <= jobs.c.created_at,
                        ),
                    )
                    .where(jobs.c.id.in_(overtaken))
                    .group_by(jobs.c.id)
                )
                if t is not None
            }
    first_signed = _first_signed(
        store, {w.review_id for w in rows if job[w.review_id].sign_count > 1}
    )
    start = _since(since) if since is not None else None
    out = []
    for w in rows:
        j = job[w.review_id]
        received = w.received_at
        if received > j.created_at:
            # With every instance re-sent since, the version's completion is the closest bound.
            received = receipt.get(j.job_id, float(j.created_at))
        if start is not None and _local(received) < start:  # as shown: to the microsecond
            continue
        signed = first_signed.get(w.review_id, w.signed_at) if j.sign_count > 0 else None
        out.append(_Reviewed(w, received, signed, int(j.sign_count), j.inference_s))
    out.sort(key=lambda r: (r.received_at, r.row.review_id))
    return out


def _first_signed(store: Store, review_ids: set[int]) -> dict[int, float]:
    """The first signing of reviews signed more than once (``reviews.signed_at`` holds the
    latest): from the audit log, where every signing is recorded."""
    if not review_ids:
        return {}
    first: dict[int, float] = {}
    for entry in Audit(store).query(action="sign"):
        review_id = entry.detail.get("review")
        if review_id in review_ids:
            first[review_id] = min(entry.at, first.get(review_id, entry.at))
    return first


def _counts(reviews_: Reviews, review_id: int) -> dict[str, int]:
    """The final count of each status of one review's findings (``Reviews.findings``)."""
    ai: Counter[str] = Counter()
    added = 0
    for f in reviews_.findings(review_id):
        if f.source == "ai":
            ai[f.status] += 1
        elif f.status == "added":
            added += 1
    return {
        "ai_findings": sum(ai.values()),
        "accepted": ai["accepted"] + ai["edited"],
        "edited": ai["edited"],
        "rejected": ai["rejected"],
        "pending": ai["pending"],
        "added": added,
    }


def _rates(per_study: pd.DataFrame) -> pd.DataFrame:
    if per_study.empty:
        return _frame([], RATE_COLUMNS)
    grouped = per_study.groupby("model", sort=False)
    table = grouped[list(_COUNTS)].sum().rename(columns={"ai_findings": "findings"})
    table["results"] = grouped.size()
    table["first"] = grouped["received_at"].min()
    table = table.sort_values(["first"], kind="stable").reset_index()
    table["decided"] = table["accepted"] + table["rejected"]
    decided = table["decided"].where(table["decided"] > 0)  # NaN: no rate without decisions
    table["acceptance_rate"] = table["accepted"] / decided
    table["rejection_rate"] = table["rejected"] / decided
    return _frame(table.to_dict("records"), RATE_COLUMNS)


_DTYPES: Final = {
    **dict.fromkeys(_TIMES, "datetime64[ns]"),
    **dict.fromkeys((f"{s}_min" for s in STAGES), "float64"),
    **dict.fromkeys(("minutes", "inference_s", "acceptance_rate", "rejection_rate"), "float64"),
    **dict.fromkeys(
        ("review_id", "study_version", "sign_count", "results", "findings", "decided", "count"),
        "int64",
    ),
    **dict.fromkeys(_COUNTS, "int64"),
    **dict.fromkeys(("study_uid", "model", "status", "stage", "kind"), "object"),
}


def _frame(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A frame of exactly ``columns`` with fixed dtypes, also when there are no records."""
    frame = pd.DataFrame.from_records(list(records), columns=list(columns))
    return frame.astype({c: _DTYPES[c] for c in columns})


def _local(at: float) -> datetime:
    return datetime.fromtimestamp(at)  # naive local time, as the app shows it


def _minutes(start: float, end: float | None) -> float:
    return (end - start) / 60.0 if end is not None else float("nan")


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        return value.timestamp()  # a naive datetime is local time
    return float(value)


def _since(value: datetime | float) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is None else value.astimezone().replace(tzinfo=None)
    return _local(float(value))


def _number(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number  # NaN: nothing to count
